// The evaluations page: the caller's question sets on the left; on the
// right the chosen set's runs (newest first), a control to run it now, two
// finished runs picked as baseline and candidate to compare (the report
// opens in a tab of its own, with its own CSP), and the set's schedules.
// It reads the API with the chat page's login cookie. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const FINISHED = "finished"; // a run is "running" until every question's turn ended
const POLL_MS = 1000; // a running run's counts, read again this often
const RUNS_PAGE = 20;
const SIDES = ["baseline", "candidate"];
const COUNTS = ["total", "succeeded", "failed", "passed", "repeats"];

let assistants = new Map(); // the caller's, by id (GET /api/assistants)
let sets = new Map(); // the sets listed, by id
let shown = null; // the chosen set's SetView

async function api(path, options = {}) {
  const response = await fetch(path, {
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    ...options,
  });
  if (response.status === 204) return null;
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error ? body.error.message : response.statusText);
    error.status = response.status;
    if (response.status === 401) showLogin();
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

function announce(text) { $("announce").textContent = text; }

function showError(err) { $("error").textContent = err.message; announce(err.message); }

function clearError() { $("error").textContent = ""; }

function showLogin() { $("login").hidden = false; $("api-key").focus(); }

$("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    await api("/api/login", { method: "POST", body: JSON.stringify({ key: $("api-key").value }) });
    $("login").hidden = true;
    $("login-error").textContent = "";
    clearError();
    await start();
  } catch (err) { $("login-error").textContent = err.message; }
});

function when(iso) {
  const time = el("time", "", new Date(iso).toLocaleString());
  time.dateTime = iso;
  return time;
}

function questions(n) { return `${n} question${n === 1 ? "" : "s"}`; }

// "Name v2", or the id of an assistant the page does not know (deleted, or
// made since it last listed them); "Default": the operator's settings.
function assistantName(id, version) {
  if (!id) return "Default";
  const known = assistants.get(id);
  const name = known ? known.name : id;
  return version === null || version === undefined ? `${name} (latest)` : `${name} v${version}`;
}

// ---- the sets ----

let setPages = 1; // the newest sets, and as many pages more as were shown

async function loadSets() {
  const items = [];
  let cursor = null;
  for (let page = 0; page < setPages; page++) {
    const body = await api("/api/sets?limit=50" + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""));
    items.push(...body.items);
    cursor = body.next_cursor;
    if (!cursor) break;
  }
  sets = new Map(items.map((s) => [s.id, s]));
  $("sets").replaceChildren(...items.map(setItem));
  $("more-sets").hidden = !cursor;
  $("no-sets").hidden = items.length > 0;
  markChosen();
  return items;
}

$("more-sets").onclick = () => { setPages += 1; loadSets().catch(showError); };

function setItem(s) {
  const li = el("li");
  li.dataset.id = s.id;
  const link = el("a", "name", s.name);
  link.href = `#${s.id}`; // opened by the hashchange: Enter and Tab work as on any link
  li.append(link, el("span", "size muted", questions(s.size)));
  return li;
}

function markChosen() {
  for (const li of $("sets").children) {
    const chosen = shown !== null && li.dataset.id === shown.id;
    li.classList.toggle("active", chosen);
    const link = li.querySelector("a");
    if (chosen) link.setAttribute("aria-current", "true"); // (an empty aria-current means false)
    else link.removeAttribute("aria-current");
  }
}

window.addEventListener("hashchange", () => {
  const id = location.hash.slice(1);
  if (id && (!shown || shown.id !== id)) openSet(id);
});

async function openSet(id) {
  if (shown) shown.close();
  shown = new SetView(id);
  markChosen();
  clearError();
  try {
    await shown.load();
  } catch (err) {
    if (err.status === 404) {
      shown.close();
      shown = null;
      history.replaceState(null, "", location.pathname);
      $("set").hidden = true;
      $("pick-set").hidden = false;
      markChosen();
    }
    showError(err);
  }
}

// ---- the chosen set ----

class SetView {
  constructor(id) {
    this.id = id;
    this.rows = new Map(); // run id -> {run, root, fill}
    this.cursor = null; // the next page of older runs
    this.timers = new Map(); // run id -> its poll's timer
    this.baseline = null; // the run ids picked to compare
    this.candidate = null;
    this.closed = false;
  }

  close() {
    this.closed = true;
    for (const timer of this.timers.values()) clearTimeout(timer);
    this.timers.clear();
  }

  async load() {
    $("pick-set").hidden = true;
    $("set").hidden = false;
    $("set-name").textContent = "…";
    $("set-description").textContent = "";
    $("set-size").textContent = "";
    $("run-rows").replaceChildren();
    $("schedule-rows").replaceChildren();
    $("no-runs").hidden = $("more-runs").hidden = $("no-schedules").hidden = true;
    this.drawCompare();
    // The list's entry, else the set itself (its questions come with it).
    const [qset, page] = await Promise.all([
      sets.get(this.id) || api(`/api/sets/${encodeURIComponent(this.id)}`),
      api(`/api/sets/${encodeURIComponent(this.id)}/runs?limit=${RUNS_PAGE}`),
    ]);
    if (this.closed) return;
    $("set-name").textContent = qset.name;
    $("set-description").textContent = qset.description || "";
    $("set-size").textContent = questions(qset.size);
    this.addPage(page);
    await this.loadSchedules();
  }

  addPage(page) {
    for (const run of page.items) this.show(run);
    this.cursor = page.next_cursor;
    $("more-runs").hidden = !this.cursor;
    $("no-runs").hidden = this.rows.size > 0;
  }

  async more() {
    const page = await api(
      `/api/sets/${encodeURIComponent(this.id)}/runs?limit=${RUNS_PAGE}&cursor=${encodeURIComponent(this.cursor)}`,
    );
    if (!this.closed) this.addPage(page);
  }

  // The newest page again: runs made elsewhere since (a schedule, another
  // tab) take their place by time; those shown are brought up to date.
  async refresh() {
    const page = await api(`/api/sets/${encodeURIComponent(this.id)}/runs?limit=${RUNS_PAGE}`);
    if (this.closed) return;
    for (const run of page.items) this.show(run);
    $("no-runs").hidden = this.rows.size > 0;
  }

  // A run drawn or redrawn, in newest-first order; followed while running.
  show(run) {
    let row = this.rows.get(run.id);
    if (row) {
      row.fill(run);
    } else {
      row = runRow(this, run);
      this.rows.set(run.id, row);
      const later = [...$("run-rows").children].find((tr) => older(this.rows.get(tr.dataset.run).run, run));
      $("run-rows").insertBefore(row.root, later || null);
    }
    if (run.status !== FINISHED) this.follow(run.id);
    $("no-runs").hidden = true;
  }

  follow(id) {
    if (this.timers.has(id) || this.closed) return;
    const tick = async () => {
      if (this.closed) return;
      try {
        const run = await api(`/api/replays/${encodeURIComponent(id)}`);
        if (this.closed) return;
        this.timers.delete(id);
        const was = this.rows.get(id).run.status;
        this.show(run); // follows it again while it runs
        if (run.status === FINISHED && was !== FINISHED) {
          announce(`Run finished: ${run.passed ?? 0} of ${run.total} passed.`);
        }
        return;
      } catch (err) {
        if (err.status === 401 || err.status === 404) { this.timers.delete(id); return; }
      }
      this.timers.set(id, setTimeout(tick, POLL_MS)); // a dropped connection: try again
    };
    this.timers.set(id, setTimeout(tick, POLL_MS));
  }

  pick(side, id) {
    this[side] = id;
    this.drawCompare();
  }

  // The comparison's links once a finished baseline and another finished
  // candidate are picked: the report (a tab of its own), CSV and JSON.
  drawCompare() {
    const { baseline, candidate } = this;
    const ready = baseline !== null && candidate !== null && baseline !== candidate;
    const query = ready ? `baseline=${encodeURIComponent(baseline)}&candidate=${encodeURIComponent(candidate)}` : "";
    for (const [id, format] of [["open-comparison", "html"], ["comparison-csv", "csv"], ["comparison-json", "json"]]) {
      const link = $(id);
      if (ready) link.href = `/api/comparisons?${query}&format=${format}`;
      else link.removeAttribute("href"); // not a link (nor in the tab order) until then
    }
    $("compare-hint").textContent = ready ? ""
      : baseline !== null && baseline === candidate ? "Pick two different runs."
        : "Pick a finished run as the baseline and another as the candidate to compare them.";
  }

  async loadSchedules() {
    const items = [];
    let cursor = null;
    do {
      const body = await api("/api/schedules?limit=100" + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""));
      items.push(...body.items.filter((s) => s.set_id === this.id));
      cursor = body.next_cursor;
    } while (cursor);
    if (this.closed) return;
    $("schedule-rows").replaceChildren(...items.map((s) => scheduleRow(s)));
    $("no-schedules").hidden = items.length > 0;
  }
}

// As the API orders them: by time, then id (ISO times of one zone compare as text).
function older(a, b) {
  return a.created_at < b.created_at || (a.created_at === b.created_at && a.id < b.id);
}

$("more-runs").onclick = () => { if (shown) shown.more().catch(showError); };

// One run: when, how far, who answered, its counts, and its place in a
// comparison (only a finished run can be picked).
function runRow(view, first) {
  const root = el("tr");
  root.dataset.run = first.id;
  const cells = {
    started: el("td", "started"),
    status: el("td", "status"),
    assistant: el("td", "assistant"),
  };
  for (const name of COUNTS) cells[name] = el("td", `num ${name}`);
  root.append(...Object.values(cells));
  const radios = {};
  for (const side of SIDES) {
    const radio = el("input");
    radio.type = "radio";
    radio.name = side;
    radio.value = first.id;
    radio.className = side;
    radio.addEventListener("change", () => { if (radio.checked) view.pick(side, first.id); });
    radios[side] = radio;
    const cell = el("td", "pick");
    cell.append(radio);
    root.append(cell);
  }
  const row = {
    run: first,
    root,
    fill(run) {
      row.run = run;
      root.dataset.status = run.status;
      cells.started.replaceChildren(when(run.created_at));
      cells.status.textContent = run.status;
      cells.assistant.textContent = assistantName(run.assistant_id, run.assistant_version);
      for (const name of COUNTS) cells[name].textContent = run[name] === null ? "–" : String(run[name]);
      const started = new Date(run.created_at).toLocaleString();
      for (const side of SIDES) {
        radios[side].disabled = run.status !== FINISHED;
        radios[side].setAttribute("aria-label", `${side === "baseline" ? "Baseline" : "Candidate"}: the run started ${started}`);
      }
    },
  };
  row.fill(first);
  return row;
}

// ---- schedules ----

function scheduleRow(first) {
  const root = el("tr");
  root.dataset.schedule = first.id;
  const cron = el("code");
  const cells = {
    cron: el("td", "cron"),
    timezone: el("td", "timezone"),
    assistant: el("td", "assistant"),
    repeats: el("td", "num repeats"),
    enabled: el("td", "enabled"),
    next: el("td", "next-run"),
  };
  cells.cron.append(cron);
  const toggle = el("input");
  toggle.type = "checkbox";
  cells.enabled.append(toggle);
  root.append(...Object.values(cells));
  let schedule = first;
  const fill = (s) => {
    schedule = s;
    cron.textContent = s.cron;
    cells.timezone.textContent = s.timezone;
    cells.assistant.textContent = assistantName(s.assistant_id, s.assistant_version);
    cells.repeats.textContent = String(s.repeats);
    toggle.checked = s.enabled;
    toggle.setAttribute("aria-label", `Enabled: runs on ${s.cron} (${s.timezone})`);
    cells.next.replaceChildren(s.next_run_at ? when(s.next_run_at) : el("span", "muted", "—"));
  };
  toggle.addEventListener("change", async () => {
    toggle.disabled = true;
    clearError();
    try {
      const changed = await api(`/api/schedules/${encodeURIComponent(schedule.id)}`, {
        method: "PATCH",
        body: JSON.stringify({ enabled: toggle.checked }),
      });
      fill(changed);
      announce(changed.enabled ? "Schedule enabled." : "Schedule disabled.");
    } catch (err) {
      fill(schedule); // as it was
      showError(err);
    }
    toggle.disabled = false;
  });
  fill(first);
  return root;
}

// ---- run now ----

// The caller's assistants, for the choice of who answers a run and to name
// those that answered; the choice stays unless its assistant is gone.
async function loadAssistants() {
  const items = [];
  let cursor = null;
  do {
    const body = await api("/api/assistants?limit=100" + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""));
    items.push(...body.items);
    cursor = body.next_cursor;
  } while (cursor);
  assistants = new Map(items.map((a) => [a.id, a]));
  const select = $("run-assistant");
  const options = [["", "Default"], ...items.map((a) => [a.id, a.name])];
  if (JSON.stringify(options) !== JSON.stringify([...select.options].map((o) => [o.value, o.text]))) {
    const chosen = select.value;
    select.replaceChildren(...options.map(([value, text]) => new Option(text, value)));
    select.value = assistants.has(chosen) ? chosen : "";
  }
}

// The set run now, by the assistant chosen at its latest version: the run
// goes to the top of the list and is followed until it finishes.
$("run-now").addEventListener("submit", async (e) => {
  e.preventDefault();
  const view = shown;
  if (!view) return;
  const body = { set_id: view.id, repeats: Number($("run-repeats").value) || 1 };
  if ($("run-assistant").value) body.assistant_id = $("run-assistant").value;
  $("run").disabled = true;
  clearError();
  try {
    const run = await api("/api/replays", { method: "POST", body: JSON.stringify(body) });
    if (!view.closed) view.show(run);
    announce("Run started.");
  } catch (err) {
    if (err.status === 404) loadAssistants().catch(() => {}); // the assistant chosen is gone
    showError(err);
  } finally {
    $("run").disabled = false;
  }
});

// Back to the page: what changed meanwhile (sets, assistants, runs made by
// a schedule or elsewhere).
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState !== "visible" || !$("login").hidden) return;
  loadSets().catch(() => {});
  loadAssistants().catch(() => {});
  if (shown) shown.refresh().catch(() => {});
});

async function start() {
  await Promise.all([loadSets(), loadAssistants()]);
  const wanted = location.hash.slice(1);
  if (wanted) await openSet(wanted);
}

start().catch(() => {});

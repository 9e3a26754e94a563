"""Branches benchmark: a session on 50 branches beside a straight one (issue 39, item 6).

    python -m tests.bench.branches [--rounds 60] [--page-rounds 10] [--out .bench/branches.json]

"Loading a session of 1,000 messages on 50 branches (the page's first draw
and the API) stays within 2x of a straight session of the same length."

Starts Postgres, Redis and the offline model (which answers nothing here:
no worker runs) and one web process, the Procfile's line (`gunicorn -k
gevent`, one worker process). Builds two sessions of one owner straight in
Postgres, each turn as the system leaves it once it ran: made by Postgres's
`submit_turn()` (queued, its question, the session's `turn_count` and
active leaf), claimed (queued -> running, attempt 1, as the worker's claim
writes it) and ended by `finish_turn()` (running -> succeeded, its answer
and the assistant's message), each change through the state machine's
trigger, one turn after another as a person would have sent them:

- straight: 500 turns, 1,000 messages, each turn following the one before
  (`branch` never used): its active path is all 500 turns.
- branched: 500 turns, 1,000 messages, a tree of 51 lines (the active one
  and 50 abandoned branches). The active path is 350 turns long. At each of
  50 places along it, path positions 3, 10, 17 … 346 (every 7th from the
  4th), the person first went on for 3 turns (the turn there and 2
  following it: the abandoned branch, 150 turns in all), then came back
  and made the path's turn there as a sibling of the first of those 3, a
  regeneration (the same question; even places) or an edit (another
  question; odd places), and went on from it. So 50 turns of the active
  path have 2 siblings ("2 / 2" on the page), each with its branch of 3
  turns beside it, and the session's leaf is its newest turn.

Answers are markdown of a few hundred characters (a paragraph with bold
and code, a list, every third a fenced code block), the same text for the
same place in either session; questions 40-120 characters.

Measured, the two sessions taken in turn (the first one first in even
rounds, the other in odd ones) so that the machine's drift moves both
sides of a ratio alike, after warm-up rounds left out:

(a) The API, through the web process with an API key, over one keep-alive
    connection (httpx): `GET /api/sessions/{id}/turns` (limit 100, the
    default): the first page, and the whole active path, following
    `next_cursor` until it is null, as the chat page loads it (5 pages
    straight, 4 branched); `GET /api/sessions/{id}/messages` (the active
    path's messages, one response). Median and p95 of `--rounds` rounds.
(b) The chat page's first draw, in Chromium (Playwright, as
    tests/test_browser.py launches it), signed in once (its cookie), each
    round a new tab opened at `/#<session id>` (how the page is told which
    session to open): from navigation start (`performance.now()`'s origin)
    until the path's last turn has its answer drawn (a MutationObserver
    sees it, then the frame that paints it: a requestAnimationFrame and a
    task after it). Also the time the page's last `/turns` response ended
    (Resource Timing): what came before is the API, what came after the
    page's own script. Median of `--page-rounds` rounds.

Checked every round: the API returns the active path, in order, each turn
with its siblings as built, and as many messages; the page shows exactly
the path's turns in order, the last with its answer. The benchmark exits
1 if a check fails. No figure is judged here: the ratios are printed and
written (branched / straight).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field

import httpx
from sqlalchemy import text

from tests import bench, services
from tests.bench.pipeline import ms, p
from tests.bench.report import report

ENV = {**bench.ENV, "REDIS_PREFIX": "branches:"}
CHROMIUM = "/usr/bin/chromium"  # Debian's package (deploy/setup.sh), as tests/test_browser.py

TURNS = 500  # each session's turns: 1,000 messages
FORKS = 50  # the branched session's abandoned branches
ABANDONED = 3  # turns in each
SPACING = 7  # path turns from one fork to the next
FIRST_FORK = 3  # the path position of the first
PATH = TURNS - FORKS * ABANDONED  # the branched session's active path: 350 turns

_SUBMIT = text(
    "SELECT (s.turn).id FROM submit_turn("
    ":session_id, :owner_id, :turn_id, :message_id, :content, NULL, NULL, false,"
    " ARRAY['queued', 'running', 'waiting'], '{}'::jsonb, NULL, NULL, :branch, :parent_id) AS s"
)
_CLAIM = text(
    "UPDATE turns SET status = 'running', attempts = 1, started_at = now(), claimed_at = now(), model = :model"
    " WHERE id = :turn_id AND status = 'queued'"
)
_FINISH = text(
    "SELECT ended FROM finish_turn("
    ":turn_id, :session_id, 1, 'succeeded', :answer, CAST(:usage AS jsonb), '[]'::jsonb, NULL, :message_id)"
)

# Resolved by the page's init script (its own scope): when the path's last
# turn has its answer drawn. `__bench.dom`: the observer saw it; `.frame`:
# the requestAnimationFrame before the frame that paints it; `.painted`: a
# task after that frame.
_WATCH = """
(() => {
  const want = %s;
  const mark = {};
  window.__bench = mark;
  const seen = () => {
    const answer = document.querySelector(`.turn[data-turn="${want}"] .msg.assistant`);
    if (!answer || !answer.textContent) return;
    observer.disconnect();
    mark.dom = performance.now();
    requestAnimationFrame(() => {
      mark.frame = performance.now();
      setTimeout(() => {
        mark.painted = performance.now();
        document.documentElement.dataset.benchPainted = "";  // what Playwright waits for
      }, 0);
    });
  };
  const observer = new MutationObserver(seen);
  observer.observe(document, { childList: true, subtree: true, characterData: true });
})();
"""
_DRAWN = """
() => {
  const turns = performance.getEntriesByType("resource")
    .filter((e) => /\\/api\\/sessions\\/[^/]+\\/turns/.test(e.name));
  return {
    ...window.__bench,
    turns_requests: turns.length,
    turns_first_start: turns.length ? Math.min(...turns.map((e) => e.startTime)) : null,
    turns_last_end: turns.length ? Math.max(...turns.map((e) => e.responseEnd)) : null,
    shown: [...document.querySelectorAll("#messages .turn")].map((t) => t.dataset.turn),
    last_answer: document.querySelector("#messages .turn:last-child .msg.assistant")?.textContent || "",
  };
}
"""

WORDS = (
    "the invoice table keeps one row per order line and the totals are summed when the month closes so a"
    " refund shows up as a negative line rather than an edit of the original row which keeps the audit"
    " trail whole and lets the report compare any two months without asking which of them was changed"
).split()


def question(n: int) -> str:
    """The n-th question: the same for the same n, in either session."""
    rng = random.Random(n)
    words = rng.sample(WORDS, rng.randint(8, 20))
    return f"Question {n}: " + " ".join(words).capitalize() + "?"


def answer(n: int) -> str:
    """A few hundred characters of markdown, as a chat model answers."""
    rng = random.Random(-n - 1)
    para = " ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 45)))
    items = "\n".join(f"- **{rng.choice(WORDS)}**: " + " ".join(rng.sample(WORDS, 7)) for _ in range(3))
    out = f"Answer {n}. {para.capitalize()}, as `orders.total` says.\n\n{items}\n"
    if n % 3 == 0:
        out += "\n```sql\nSELECT customer_id, sum(total) FROM orders\nGROUP BY customer_id ORDER BY 2 DESC;\n```\n"
    return out


@dataclass
class Chat:
    """A session built for the benchmark, and what loading it must show."""

    name: str
    id: str = ""
    path: list[str] = field(default_factory=list)  # the active path's turn ids, in order
    siblings: dict[str, list[str]] = field(default_factory=dict)  # a path turn's, where it has more than itself
    last_answer: str = ""
    turns: int = 0


class Builder:
    """Turns written as the system leaves them once they ran (see the module's docstring)."""

    def __init__(self, conn, owner_id: str, chat: Chat) -> None:
        self.conn, self.owner_id, self.chat = conn, owner_id, chat
        self.answers: dict[str, str] = {}

    def turn(self, parent: str | None, message: str, reply: str, branch: bool) -> str:
        """One turn, following the session's leaf, or with `branch` `parent`."""
        turn_id = self.conn.execute(
            _SUBMIT,
            {
                "session_id": self.chat.id,
                "owner_id": self.owner_id,
                "turn_id": str(uuid.uuid4()),
                "message_id": str(uuid.uuid4()),
                "content": message,
                "branch": branch,
                "parent_id": parent,
            },
        ).scalar_one()
        turn_id = str(turn_id)
        claimed = self.conn.execute(_CLAIM, {"turn_id": turn_id, "model": "turnstream-offline"})
        usage = {"prompt_tokens": 40 + 3 * self.chat.turns, "completion_tokens": len(reply) // 4}
        ended = self.conn.execute(
            _FINISH,
            {
                "turn_id": turn_id,
                "session_id": self.chat.id,
                "answer": reply,
                "usage": json.dumps(usage),
                "message_id": str(uuid.uuid4()),
            },
        ).scalar_one()
        if claimed.rowcount != 1 or ended != "ended":
            raise SystemExit(f"building {self.chat.name}: turn {turn_id} claimed {claimed.rowcount}, ended {ended}")
        self.chat.turns += 1
        self.answers[turn_id] = reply
        return turn_id


def build(owner_id: str) -> tuple[Chat, Chat]:
    """The two sessions (see the module's docstring)."""
    from shared.db import autocommit_engine

    chats = Chat("straight"), Chat("branched")
    with autocommit_engine().connect() as conn:
        for chat in chats:
            chat.id = str(uuid.uuid4())
            conn.execute(
                text("INSERT INTO sessions (id, owner_id, title) VALUES (:id, :owner_id, :title)"),
                {"id": chat.id, "owner_id": owner_id, "title": f"{chat.name} session, 1,000 messages"},
            )
        straight, branched = chats

        make = Builder(conn, owner_id, straight)
        for n in range(TURNS):
            straight.path.append(make.turn(None, question(n), answer(n), branch=False))
        straight.last_answer = make.answers[straight.path[-1]]

        make = Builder(conn, owner_id, branched)
        forks = {FIRST_FORK + SPACING * k for k in range(FORKS)}
        for n in range(PATH):
            parent = branched.path[-1] if branched.path else None
            message, reply = question(n), answer(n)
            if n in forks:
                line = []
                for m in range(ABANDONED):  # the line the person left
                    words = (question(n + m), answer(n + m))
                    line.append(make.turn(line[-1] if line else parent, *words, branch=True))
                old = line[0]
                if (n - FIRST_FORK) // SPACING % 2:  # an edit: another question in its place
                    message = message.replace("?", ", and for last year?")
                reply = reply.replace(f"Answer {n}.", f"Answer {n}, again.")
                new = make.turn(parent, message, reply, branch=True)
                branched.siblings[new] = [old, new]
                branched.path.append(new)
            else:
                branched.path.append(make.turn(None, message, reply, branch=False))
        branched.last_answer = make.answers[branched.path[-1]]

        for chat in chats:
            row = conn.execute(
                text(
                    "SELECT s.turn_count, s.active_turn_id, (SELECT count(*) FROM messages m"
                    " WHERE m.session_id = s.id) AS messages FROM sessions s WHERE s.id = :id"
                ),
                {"id": chat.id},
            ).one()
            if (row.turn_count, str(row.active_turn_id), row.messages) != (TURNS, chat.path[-1], 2 * TURNS):
                raise SystemExit(f"{chat.name} was built wrong: {row}")
        conn.execute(text("ANALYZE turns; ANALYZE messages; ANALYZE sessions"))
    return chats


# ---- (a) the API ----


def load_turns(http: httpx.Client, chat: Chat) -> tuple[float, float, list[dict], int, int]:
    """The whole active path as the chat page loads it: seconds to the first
    page, seconds in all, the items, requests made, bytes received."""
    items, cursor, requests, size = [], None, 0, 0
    start = time.perf_counter()
    first = None
    while True:
        response = http.get(f"/api/sessions/{chat.id}/turns", params={"cursor": cursor} if cursor else None)
        requests += 1
        if first is None:
            first = time.perf_counter() - start
        response.raise_for_status()
        size += len(response.content)
        page = response.json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    return first, time.perf_counter() - start, items, requests, size


def load_messages(http: httpx.Client, chat: Chat) -> tuple[float, list[dict], int]:
    start = time.perf_counter()
    response = http.get(f"/api/sessions/{chat.id}/messages")
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed, response.json()["items"], len(response.content)


def check_turns(chat: Chat, items: list[dict]) -> str | None:
    if [t["id"] for t in items] != chat.path:
        return f"{chat.name}: the turns listed are not its active path ({len(items)} of {len(chat.path)})"
    for t in items:
        if t["siblings"] != chat.siblings.get(t["id"], [t["id"]]):
            return f"{chat.name}: turn {t['number']} has siblings {t['siblings']}"
        if t["status"] != "succeeded" or not t["answer"]:
            return f"{chat.name}: turn {t['number']} is {t['status']} with no answer"
    return None


def check_messages(chat: Chat, items: list[dict]) -> str | None:
    expected = [turn for turn in chat.path for _role in ("user", "assistant")]
    if [m["turn_id"] for m in items] != expected or [m["role"] for m in items[:2]] != ["user", "assistant"]:
        return f"{chat.name}: the messages listed are not its active path's ({len(items)} of {len(expected)})"
    return None


def in_turn(chats: tuple[Chat, Chat], round_: int) -> tuple[Chat, ...]:
    return chats if round_ % 2 == 0 else chats[::-1]


def measure_api(base: str, key: str, chats: tuple[Chat, Chat], rounds: int, warmup: int, problems: list[str]):
    figures = {c.name: {"first_page": [], "full": [], "messages": []} for c in chats}
    shape = {}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        for r in range(warmup + rounds):
            for chat in in_turn(chats, r):
                first, full, items, requests, size = load_turns(http, chat)
                if (problem := check_turns(chat, items)) is not None:
                    problems.append(problem)
                if r >= warmup:
                    figures[chat.name]["first_page"].append(first)
                    figures[chat.name]["full"].append(full)
                shape.setdefault(chat.name, {})["turns_requests"] = requests
                shape[chat.name]["turns_bytes"] = size
            for chat in in_turn(chats, r):
                elapsed, items, size = load_messages(http, chat)
                if (problem := check_messages(chat, items)) is not None:
                    problems.append(problem)
                if r >= warmup:
                    figures[chat.name]["messages"].append(elapsed)
                shape[chat.name]["messages_bytes"] = size
            if problems:
                break
    return figures, shape


# ---- (b) the page ----


def measure_page(base: str, key: str, chats: tuple[Chat, Chat], rounds: int, warmup: int, problems: list[str]):
    from playwright.sync_api import sync_playwright

    figures = {c.name: {"drawn": [], "dom": [], "turns_fetched": [], "script_after_fetch": []} for c in chats}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
        )
        context = browser.new_context()
        page = context.new_page()  # signed in once: the cookie serves every tab after
        page.goto(base)
        page.locator("#api-key").fill(key)
        page.locator("#login button").click()
        page.locator("#login").wait_for(state="hidden")
        page.close()
        for r in range(warmup + rounds):
            for chat in in_turn(chats, r):
                page = context.new_page()
                page.add_init_script(_WATCH % json.dumps(chat.path[-1]))
                try:
                    page.goto(f"{base}/#{chat.id}", wait_until="commit")
                    # (a selector, not a predicate: the page's CSP refuses the eval a string predicate takes)
                    page.wait_for_selector("html[data-bench-painted]", state="attached", timeout=120_000)
                    seen = page.evaluate(_DRAWN)
                except Exception as exc:  # noqa: BLE001 - reported, then the run ends with 1
                    problems.append(f"{chat.name}: the page did not draw its path's last turn: {exc}")
                    page.close()
                    break
                page.close()
                if seen["shown"] != chat.path:
                    problems.append(f"{chat.name}: the page shows {len(seen['shown'])} turns, not its active path")
                if seen["last_answer"].split()[:2] != chat.last_answer.split()[:2]:
                    problems.append(f"{chat.name}: the last turn's answer reads {seen['last_answer'][:40]!r}")
                if r >= warmup:
                    f = figures[chat.name]
                    f["drawn"].append(seen["painted"] / 1000)
                    f["dom"].append(seen["dom"] / 1000)
                    f["turns_fetched"].append(seen["turns_last_end"] / 1000)
                    f["script_after_fetch"].append((seen["painted"] - seen["turns_last_end"]) / 1000)
            if problems:
                break
        browser.close()
    return figures


# ---- the report ----


def summary(values: list[float]) -> dict:
    if not values:
        return {}
    return {"p50_ms": ms(statistics.median(values)), "p95_ms": ms(p(values, 95)), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60, help="API rounds measured (each loads both sessions)")
    parser.add_argument("--page-rounds", type=int, default=10, help="page loads measured of each session")
    parser.add_argument("--warmup", type=int, default=3, help="API rounds left out first")
    parser.add_argument("--page-warmup", type=int, default=1, help="page rounds left out first")
    parser.add_argument("--out", default=".bench/branches.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    problems: list[str] = []
    with services.stack("turnstream-bench-branches-", ENV, (), mcp=False) as info:
        from web.auth import create_key, lookup_key

        key = create_key(f"bench-{uuid.uuid4().hex[:8]}")
        owner_id = lookup_key(key).owner_id
        started = time.perf_counter()
        chats = build(owner_id)
        built_s = time.perf_counter() - started
        print(f"built both sessions in {built_s:.1f} s", flush=True)
        web, port = services.start_gunicorn(info["logdir"], info["env"])
        base = f"http://127.0.0.1:{port}"
        services.wait_until(lambda: httpx.get(f"{base}/not-found", timeout=2).status_code == 404, 30, "web")
        try:
            print(f"the API, {args.rounds} rounds …", flush=True)
            api, shape = measure_api(base, key, chats, args.rounds, args.warmup, problems)
            page = {}
            if not problems:
                print(f"the page, {args.page_rounds} rounds …", flush=True)
                page = measure_page(base, key, chats, args.page_rounds, args.page_warmup, problems)
        finally:
            web.stop()

    straight, branched = chats
    results: dict = {
        "sessions": {
            chat.name: {
                "turns": chat.turns,
                "messages": 2 * chat.turns,
                "active_path_turns": len(chat.path),
                "path_turns_with_siblings": len(chat.siblings),
                **shape.get(chat.name, {}),
            }
            for chat in chats
        },
        "shape": {"forks": FORKS, "abandoned_turns_each": ABANDONED, "fork_every": SPACING, "first_fork": FIRST_FORK},
        "rounds": args.rounds,
        "page_rounds": args.page_rounds,
        "warmup": args.warmup,
        "page_warmup": args.page_warmup,
        "build_s": round(built_s, 1),
        "api": {name: {m: summary(v) for m, v in f.items()} for name, f in api.items()},
        "page": {name: {m: summary(v) for m, v in f.items()} for name, f in page.items()},
        "problems": problems,
    }
    ratios: dict = {}
    for part in ("api", "page"):
        if not results[part]:
            continue
        s, b = results[part]["straight"], results[part]["branched"]
        ratios[part] = {
            measure: {q: round(b[measure][q] / s[measure][q], 2) for q in ("p50_ms", "p95_ms") if s[measure]}
            for measure in s
        }
    # The two active paths differ in length (500 and 350 turns): the same
    # medians per turn of the path, for what each turn costs.
    per_turn = {}
    for part, measure in (("api", "full"), ("page", "drawn")):
        if results[part]:
            each = {c.name: results[part][c.name][measure]["p50_ms"] / len(c.path) for c in chats}
            per_turn[f"{part}_{measure}"] = {
                **{name: round(v, 3) for name, v in each.items()},
                "branched_over_straight": round(each["branched"] / each["straight"], 2),
            }
    results["p50_ms_per_path_turn"] = per_turn
    results["branched_over_straight"] = ratios

    def pair(part: str, measure: str, q: str = "p50_ms") -> str:
        if not results[part]:
            return "-"
        s, b = results[part]["straight"][measure], results[part]["branched"][measure]
        ratio = ratios[part][measure].get(q, "-")
        return f"{s.get(q, '-')} / {b.get(q, '-')}  ({ratio})"

    rows = [
        (
            "sessions: turns / messages / active path turns (straight; branched)",
            f"{straight.turns} / {2 * straight.turns} / {len(straight.path)};"
            f" {branched.turns} / {2 * branched.turns} / {len(branched.path)}"
            f" ({len(branched.siblings)} with 2 siblings, {FORKS} abandoned branches of {ABANDONED})",
        ),
        (
            "turns pages / bytes, messages bytes (straight; branched)",
            "; ".join(
                f"{shape[c.name]['turns_requests']} / {shape[c.name]['turns_bytes']:,},"
                f" {shape[c.name]['messages_bytes']:,}"
                for c in chats
                if c.name in shape
            ),
        ),
        ("ms, straight / branched  (branched / straight)", ""),
        ("API GET …/turns, first page, p50", pair("api", "first_page")),
        ("API GET …/turns, first page, p95", pair("api", "first_page", "p95_ms")),
        ("API GET …/turns, whole active path, p50", pair("api", "full")),
        ("API GET …/turns, whole active path, p95", pair("api", "full", "p95_ms")),
        ("API GET …/messages, p50", pair("api", "messages")),
        ("API GET …/messages, p95", pair("api", "messages", "p95_ms")),
        ("page: navigation to the last turn drawn, p50", pair("page", "drawn")),
        ("page: navigation to the last turn drawn, p95", pair("page", "drawn", "p95_ms")),
        ("page: … to its last /turns response, p50", pair("page", "turns_fetched")),
        ("page: … from that response to the draw, p50", pair("page", "script_after_fetch")),
        *(
            (
                f"{label}, p50 per turn of the path",
                f"{per_turn[name]['straight']} / {per_turn[name]['branched']}"
                f"  ({per_turn[name]['branched_over_straight']})",
            )
            for name, label in (("api_full", "API whole active path"), ("page_drawn", "page: last turn drawn"))
            if name in per_turn
        ),
        ("problems", "; ".join(problems) or "none"),
    ]
    report(rows, results, args.out)
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

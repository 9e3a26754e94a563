"""Following turns the way a client does, and what Postgres holds of them:
shared by the tests that break processes on purpose (chaos, hosts,
failover)."""

from __future__ import annotations

import itertools
import time

import httpx
from sqlalchemy import func, select

from shared.db import transaction
from shared.events import ENDING_TYPES
from shared.models import Message, Turn
from shared.turn_states import ENDED
from tests.sse import iter_sse


def follow(base: str, headers: dict, turn_id: str, deadline: float, out: dict) -> None:
    """Follow a turn's events to its end, reconnecting with Last-Event-ID
    whenever the stream breaks; out[turn_id] gets (time, event) pairs, whether
    it ended, and how many reconnects it took."""
    events: list = []
    last = None
    out[turn_id] = {"events": events, "ended": False, "reconnects": 0}
    while time.monotonic() < deadline:
        h = {**headers, **({"Last-Event-ID": last} if last else {})}
        try:
            with httpx.stream("GET", f"{base}/api/turns/{turn_id}/events", headers=h, timeout=20) as r:
                if r.status_code == 204:
                    out[turn_id]["ended"] = True
                    return
                for item in iter_sse(r) if r.status_code == 200 else ():
                    if isinstance(item, tuple):
                        continue
                    events.append((time.monotonic(), item))
                    last = item.id or last
                    if item.event in ENDING_TYPES or (item.event == "turn.snapshot" and item.data["status"] in ENDED):
                        out[turn_id]["ended"] = True
                        return
        except httpx.HTTPError:
            pass
        out[turn_id]["reconnects"] += 1
        time.sleep(0.2)


def shown_text(events: list) -> str:
    """The answer a client shows after these events: the latest attempt's
    (a turn.restarted drops what came before; a turn.snapshot replaces it)."""
    cuts = [i for i, e in enumerate(events) if e.event in ("turn.restarted", "turn.snapshot")]
    after = events[cuts[-1] :] if cuts else events
    text = after[0].data.get("text", "") if after and after[0].event == "turn.snapshot" else ""
    return text + "".join(e.data.get("delta", "") for e in after if e.event == "message.delta")


def stored(ids: list[str]) -> tuple[dict[str, Turn], dict[str, int]]:
    """The turns' rows, and how many assistant answers each has."""
    with transaction() as db:
        turns = {t.id: t for t in db.scalars(select(Turn).where(Turn.id.in_(ids)))}
        answers = dict(
            db.execute(
                select(Message.turn_id, func.count())
                .where(Message.turn_id.in_(ids), Message.role == "assistant")
                .group_by(Message.turn_id)
            ).all()
        )
    return turns, answers


def ended(ids: list[str]) -> int:
    """How many of the turns have ended."""
    with transaction() as db:
        return db.scalar(select(func.count()).where(Turn.id.in_(ids), Turn.status.in_(ENDED)))


def keep_sending(base: str, headers: dict, sid: str, stop, results: list) -> None:
    """One client until `stop` is set: GET its session and POST a new one in
    turn; results gets (started, ended, status, id of the session a POST
    created or None) for each request."""
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        for n in itertools.count():
            if stop.is_set():
                return
            started, created = time.monotonic(), None
            try:
                if n % 2:
                    r = http.post("/api/sessions", json={})
                    created = r.json()["id"] if r.status_code == 201 else None
                else:
                    r = http.get(f"/api/sessions/{sid}")
                status: object = r.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            results.append((started, time.monotonic(), status, created))
            time.sleep(0.02)

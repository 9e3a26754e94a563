"""A request that meets Postgres away (a restart) runs again only the step
that needed it, authentication or the view (web.App,
shared/db.run_again_while_away): its span and its rate-limit count happen
once, however often that step runs.

The module runs its own Postgres and Redis, as tests/test_chaos.py does, so
it can restart them; the app reaches Postgres directly, since behind
PgBouncer a query waits for the server to return and nothing runs again.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import replace

import pytest
from limits import parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from shared import logs, tracing
from tests import services
from tests.conftest import TEST_ENV

LIMIT = "50/minute"  # counted, never reached


@pytest.fixture(scope="module")
def away_stack():
    with services.stack("turnstream-away-", TEST_ENV, ("--first-token-delay", "0"), mcp=False) as info:
        yield info


class ServerSpans(SpanProcessor):
    """How many server spans each request id started, and ended."""

    def __init__(self) -> None:
        self.started: Counter[str] = Counter()
        self.ended: Counter[str] = Counter()

    def on_start(self, span, parent_context=None) -> None:
        if span.kind is trace.SpanKind.SERVER:
            self.started[span.attributes["turnstream.request_id"]] += 1

    def on_end(self, span) -> None:
        if span.kind is trace.SpanKind.SERVER:
            self.ended[span.attributes["turnstream.request_id"]] += 1


class RunAgain(logging.Handler):
    """The ids of the requests whose work ran again (shared/db's warning)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.ids: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if "running it again" in record.getMessage():
            self.ids.add(logs.bound().get("request_id"))


def test_a_request_run_again_across_a_postgres_restart_has_one_span_and_one_rate_limit_hit(away_stack, monkeypatch):
    from shared.config import get_settings
    from shared.db import transaction
    from shared.models import ChatSession
    from web import create_app
    from web.auth import create_key, lookup_key

    monkeypatch.setenv("DATABASE_URL", f"postgres://turnstream@127.0.0.1:{away_stack['pg_port']}/turnstream")
    services.reset_process_singletons()  # the settings read again, the engine built again
    settings = replace(
        get_settings(),
        rate_limits_enabled=True,
        rate_limit_submit=LIMIT,
        rate_limit_submit_address=LIMIT,
        key_cache_seconds=600,  # a key used before the restart is not asked of Postgres again
    )
    app = create_app(settings)

    def new_owner() -> tuple[str, str]:
        key = create_key(f"away-{uuid.uuid4().hex[:8]}")
        return key, lookup_key(key).owner_id

    # Four whose key this app has not seen: authentication meets the outage.
    # Four whose key it remembers: the view meets it, after the rate limit.
    callers = []
    for _ in range(4):
        key, owner_id = new_owner()
        with transaction() as db:
            chat = ChatSession(owner_id=owner_id, title="away", meta={})
            db.add(chat)
            db.flush()
            callers.append((key, owner_id, chat.id))
    for _ in range(4):
        key, owner_id = new_owner()
        made = app.test_client().post("/api/sessions", json={}, headers={"Authorization": f"Bearer {key}"})
        callers.append((key, owner_id, made.get_json()["id"]))

    spans = ServerSpans()
    provider = TracerProvider()
    provider.add_span_processor(spans)
    monkeypatch.setattr(tracing, "tracer", provider.get_tracer("turnstream"))
    run_again = RunAgain()
    logging.getLogger("shared.db").addHandler(run_again)
    statuses: dict[str, int] = {}

    def submit(n: int, key: str, session_id: str) -> None:
        answer = app.test_client().post(
            f"/api/sessions/{session_id}/turns",
            json={"message": "asked while Postgres restarts"},
            headers={"Authorization": f"Bearer {key}", "X-Request-ID": f"away-{n}"},
            environ_base={"REMOTE_ADDR": f"10.9.9.{n}"},
        )
        statuses[f"away-{n}"] = answer.status_code

    postgres = away_stack["postgres"]
    senders = [threading.Thread(target=submit, args=(n, k, s)) for n, (k, _o, s) in enumerate(callers)]
    try:
        postgres.stop(signal.SIGINT)  # a fast shutdown: every connection closed
        try:
            for sender in senders:
                sender.start()
            time.sleep(1.5)  # each request meets the outage and waits
        finally:
            postgres.start()
        services.wait_until(services._db_ready, 30, "Postgres accepting connections again")
        for sender in senders:
            sender.join(30)
    finally:
        logging.getLogger("shared.db").removeHandler(run_again)
        app.extensions["turnstream.relay"].close()

    ids = [f"away-{n}" for n in range(len(callers))]
    assert statuses == dict.fromkeys(ids, 202)  # each waited for Postgres
    assert run_again.ids >= set(ids)  # each met the outage and ran again

    limiter = MovingWindowRateLimiter(
        storage_from_string(settings.redis_url, key_prefix=f"{settings.redis_prefix}limits")
    )
    item = parse(LIMIT)

    def hits(setting: str, who: str) -> int:
        return item.amount - limiter.get_window_stats(item, setting, who).remaining

    counted = {
        f"away-{n}": (
            hits("rate_limit_submit", f"owner:{owner_id}"),
            hits("rate_limit_submit_address", f"address:10.9.9.{n}"),
        )
        for n, (_k, owner_id, _s) in enumerate(callers)
    }
    started = {i: spans.started[i] for i in ids}
    ended = {i: spans.ended[i] for i in ids}
    print(f"\nPostgres away: spans started {started}, ended {ended}; rate-limit hits (key, address) {counted}")
    assert started == ended == dict.fromkeys(ids, 1), (started, ended)
    assert counted == dict.fromkeys(ids, (1, 1)), counted

"""Sending webhooks. Each attempt (`deliver_webhook`) runs on the `webhooks`
queue, which only the Procfile's `webhooks` process consumes: a slow
receiver never holds a turn worker's thread.

Beat sends `dispatch_webhooks` every second, on the maintenance queue (the
turn workers', as the sweeper: it is one query). It takes the deliveries that
are due (`FOR UPDATE SKIP LOCKED`: two dispatchers never take the same),
leaves them alone for a lease (four WEBHOOK_TIMEOUT_SECONDS) and sends
`deliver_webhook` for each, with its count of attempts. An attempt claims
the next count before it posts, so a message delivered twice (a broker's
redelivery) posts once, and a delivery whose worker died mid-post is due
again when its lease ends, with the same webhook-id: a receiver that saw it
already knows it by that id.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta

from celery import shared_task
from sqlalchemy import func, select, update

from shared.broker import DELIVER_WEBHOOK, DISPATCH_WEBHOOKS, WEBHOOKS_QUEUE, get_celery
from shared.config import get_settings
from shared.db import transaction
from shared.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from shared.webhooks import next_wait, post
from tasks.base import TurnstreamTask

log = logging.getLogger(__name__)

BATCH = 500
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@shared_task(name=DISPATCH_WEBHOOKS, base=TurnstreamTask, send_events=False)
def dispatch_webhooks() -> int:
    """Send the deliveries that are due; how many."""
    with transaction() as db:
        due = db.execute(
            select(WebhookDelivery.id, WebhookDelivery.attempts)
            .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= func.now())
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(BATCH)
            .with_for_update(skip_locked=True)
        ).all()
        if due:  # not taken again by the next dispatch while its task waits in the queue
            db.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_([d.id for d in due]))
                .values(next_attempt_at=func.now() + _lease())
            )
    app = get_celery()
    for delivery_id, attempts in due:
        app.send_task(DELIVER_WEBHOOK, args=[delivery_id, attempts], queue=WEBHOOKS_QUEUE)
    return len(due)


# No task events (as the sweeper): Flower's list is there to show turns, and
# the deliveries' own log is Postgres's (GET /api/webhooks/{id}/deliveries).
@shared_task(name=DELIVER_WEBHOOK, base=TurnstreamTask, send_events=False)
def deliver_webhook(delivery_id: str, attempts: int) -> str:
    """One attempt of one delivery that had made `attempts` when it was
    sent (a message sent again after another attempt began does nothing),
    recorded; the next one scheduled, or the delivery ended (delivered, or
    failed: retries run out, a 410)."""
    with transaction() as db:
        row = db.execute(
            select(WebhookDelivery, WebhookEndpoint)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING)
        ).one_or_none()
        if row is None:
            return f"{delivery_id}: nothing to send"
        delivery, endpoint = row
        attempt = attempts + 1
        claimed = db.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == PENDING,
                WebhookDelivery.attempts == attempts,
            )
            .values(attempts=attempt, next_attempt_at=func.now() + _lease())
        ).rowcount
        secrets = [endpoint.secret]
        if (
            endpoint.previous_secret
            and endpoint.previous_secret_until
            and db.scalar(select(func.now() < endpoint.previous_secret_until))
        ):
            secrets.append(endpoint.previous_secret)
        url, enabled, body = endpoint.url, endpoint.enabled, _body(delivery.payload)
    if not claimed:
        return f"{delivery_id}: another worker has this attempt"
    if not enabled:
        _end(delivery_id, attempt, FAILED, None, 0, "the endpoint is disabled")
        return f"{delivery_id}: endpoint disabled"
    answer = post(url, delivery_id, body, secrets)
    if answer.delivered:
        _end(delivery_id, attempt, DELIVERED, answer.status, answer.duration_ms, None)
        return f"{delivery_id}: delivered (attempt {attempt}, HTTP {answer.status})"
    if answer.status == 410:  # the receiver says it is gone for good
        _end(delivery_id, attempt, FAILED, 410, answer.duration_ms, answer.error, disable=endpoint.id)
        log.warning("webhook endpoint %s answered 410 Gone: disabled", endpoint.id)
        return f"{delivery_id}: 410, endpoint disabled"
    wait = next_wait(attempt, answer)
    if wait is None:
        _end(delivery_id, attempt, FAILED, answer.status, answer.duration_ms, answer.error)
        return f"{delivery_id}: failed after {attempt} attempts ({answer.error})"
    _record(delivery_id, attempt, answer.status, answer.duration_ms, answer.error, retry_in=wait)
    return f"{delivery_id}: attempt {attempt} failed ({answer.error}); next in {wait:g} s"


def _lease() -> timedelta:
    """How long a taken delivery is left alone: longer than an attempt can take."""
    return timedelta(seconds=get_settings().webhook_timeout * 4)


def _body(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _end(
    delivery_id: str,
    attempt: int,
    status: str,
    code: int | None,
    duration_ms: int,
    error: str | None,
    disable: str | None = None,
) -> None:
    _record(delivery_id, attempt, code, duration_ms, error, ended=status, disable=disable)


def _record(
    delivery_id: str,
    attempt: int,
    code: int | None,
    duration_ms: int,
    error: str | None,
    *,
    retry_in: float | None = None,
    ended: str | None = None,
    disable: str | None = None,
) -> None:
    """The attempt in the delivery's log, and what comes next, if this
    attempt still holds the delivery."""
    values: dict = {"last_status": code, "last_error": error}
    if ended is not None:
        values |= {"status": ended, "finished_at": func.now()}
    else:
        values["next_attempt_at"] = func.now() + timedelta(seconds=retry_in or 0)
    with transaction() as db:
        held = db.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.attempts == attempt,
                WebhookDelivery.status == PENDING,
            )
            .values(**values)
        ).rowcount
        if not held:
            return
        db.add(
            WebhookAttempt(
                delivery_id=delivery_id, number=attempt, status_code=code, duration_ms=duration_ms, error=error
            )
        )
        if disable is not None:
            db.execute(
                update(WebhookEndpoint)
                .where(WebhookEndpoint.id == disable)
                .values(enabled=False, disabled_reason="the receiver answered 410 Gone", updated_at=func.now())
            )

"""Webhook endpoints: the caller's URLs told of events (shared/webhooks.py),
their secrets (shown once), their deliveries' log, and a redelivery."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Blueprint, g, jsonify, request
from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import Session

from shared.db import transaction
from shared.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from shared.webhooks import Refused, check_url, new_secret
from web import schemas
from web.errors import ApiError
from web.openapi import operation
from web.resources import int_arg, iso, owned, parse_time_cursor, time_cursor
from web.validation import SecretRotation, WebhookCreate, WebhookUpdate, parse_body

bp = Blueprint("webhooks", __name__)
PAGE = {"limit": {"type": "integer", "minimum": 1, "maximum": 100}, "cursor": {"type": "string"}}


def endpoint_json(endpoint: WebhookEndpoint, secret: str | None = None) -> dict[str, Any]:
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "event_types": endpoint.event_types,
        "enabled": endpoint.enabled,
        "disabled_reason": endpoint.disabled_reason,
        "secret": secret,
        "previous_secret_until": iso(endpoint.previous_secret_until),
        "created_at": iso(endpoint.created_at),
        "updated_at": iso(endpoint.updated_at),
    }


def _checked(url: str) -> str:
    try:
        return check_url(url)
    except Refused as exc:
        raise ApiError(422, f"url: {exc}", {"field": "url"}) from None


@bp.post("/api/webhooks")
@operation(
    "Add a webhook endpoint: the URL is told of the events named, each signed with its secret (shown here once)",
    {201: schemas.WebhookEndpoint},
    body=WebhookCreate,
)
def create():
    body = parse_body(WebhookCreate)
    with transaction() as db:
        data = create_endpoint(db, g.owner_id, body)
    return jsonify(data), 201


def create_endpoint(db: Session, owner_id: str, body: WebhookCreate) -> dict[str, Any]:
    """A new endpoint, as JSON with its secret (the only time it is shown)."""
    url, secret = _checked(body.url), new_secret()
    endpoint = WebhookEndpoint(
        owner_id=owner_id, url=url, event_types=sorted(set(body.event_types)), secret=secret, enabled=body.enabled
    )
    db.add(endpoint)
    db.flush()
    db.refresh(endpoint)
    return endpoint_json(endpoint, secret)


@bp.get("/api/webhooks")
@operation("The caller's webhook endpoints, oldest first", {200: schemas.WebhookEndpointPage}, query=PAGE)
def list_endpoints():
    limit = int_arg("limit", 50, 1, 100)
    after = parse_time_cursor(request.args.get("cursor"))
    query = (
        select(WebhookEndpoint)
        .where(WebhookEndpoint.owner_id == g.owner_id)
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
        .limit(limit + 1)
    )
    if after is not None:
        query = query.where(tuple_(WebhookEndpoint.created_at, WebhookEndpoint.id) > after)
    with transaction() as db:
        rows = db.scalars(query).all()
        items = [endpoint_json(e) for e in rows[:limit]]
    last = rows[limit - 1] if len(rows) > limit else None
    return jsonify({"items": items, "next_cursor": time_cursor(last.created_at, last.id) if last else None})


@bp.get("/api/webhooks/<webhook_id>")
@operation("A webhook endpoint (its secret is not shown again)", {200: schemas.WebhookEndpoint})
def get(webhook_id: str):
    with transaction() as db:
        return jsonify(endpoint_json(owned(db, WebhookEndpoint, webhook_id)))


@bp.patch("/api/webhooks/<webhook_id>")
@operation(
    "Change a webhook endpoint's URL, event types, or whether it is enabled (enabling clears why it was not)",
    {200: schemas.WebhookEndpoint},
    body=WebhookUpdate,
)
def update_endpoint(webhook_id: str):
    body = parse_body(WebhookUpdate)
    url = _checked(body.url) if body.url is not None else None
    with transaction() as db:
        endpoint = owned(db, WebhookEndpoint, webhook_id, lock=True)
        if url is not None:
            endpoint.url = url
        if body.event_types is not None:
            endpoint.event_types = sorted(set(body.event_types))
        if body.enabled is not None:
            endpoint.enabled = body.enabled
            if body.enabled:
                endpoint.disabled_reason = None
        endpoint.updated_at = func.now()
        db.flush()
        db.refresh(endpoint)
        return jsonify(endpoint_json(endpoint))


@bp.delete("/api/webhooks/<webhook_id>")
@operation("Delete a webhook endpoint and its deliveries' log", {204: None})
def delete(webhook_id: str):
    with transaction() as db:
        db.delete(owned(db, WebhookEndpoint, webhook_id, lock=True))
    return "", 204


@bp.post("/api/webhooks/<webhook_id>/rotate-secret")
@operation(
    "A new secret (shown here once); the one before still signs, beside it, for `overlap_seconds`",
    {200: schemas.WebhookEndpoint},
    body=SecretRotation,
)
def rotate_secret(webhook_id: str):
    body = parse_body(SecretRotation)
    secret = new_secret()
    with transaction() as db:
        endpoint = owned(db, WebhookEndpoint, webhook_id, lock=True)
        endpoint.previous_secret = endpoint.secret if body.overlap_seconds else None
        endpoint.previous_secret_until = (
            func.now() + timedelta(seconds=body.overlap_seconds) if body.overlap_seconds else None
        )
        endpoint.secret = secret
        endpoint.updated_at = func.now()
        db.flush()
        db.refresh(endpoint)
        return jsonify(endpoint_json(endpoint, secret))


@bp.get("/api/webhooks/<webhook_id>/deliveries")
@operation(
    "A webhook endpoint's deliveries, newest first, each with its attempts (status, duration)",
    {200: schemas.WebhookDeliveryPage},
    query=PAGE,
)
def list_deliveries(webhook_id: str):
    limit = int_arg("limit", 20, 1, 100)
    before = parse_time_cursor(request.args.get("cursor"))
    with transaction() as db:
        endpoint = owned(db, WebhookEndpoint, webhook_id)
        query = (
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint.id)
            .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
            .limit(limit + 1)
        )
        if before is not None:
            query = query.where(tuple_(WebhookDelivery.created_at, WebhookDelivery.id) < before)
        rows = db.scalars(query).all()
        items = [_delivery_json(db, d) for d in rows[:limit]]
    last = rows[limit - 1] if len(rows) > limit else None
    return jsonify({"items": items, "next_cursor": time_cursor(last.created_at, last.id) if last else None})


@bp.post("/api/webhooks/<webhook_id>/deliveries/<delivery_id>/redeliver")
@operation(
    "Send a delivery again now (with the same webhook-id), delivered or failed alike; 409 while its endpoint"
    " is disabled",
    {202: schemas.WebhookDelivery},
    errors=(409,),
)
def redeliver(webhook_id: str, delivery_id: str):
    with transaction() as db:
        endpoint = owned(db, WebhookEndpoint, webhook_id)
        delivery = db.scalar(
            select(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.endpoint_id == endpoint.id)
            .with_for_update()
        )
        if delivery is None:
            raise ApiError(404, "no such delivery")
        if not endpoint.enabled:
            raise ApiError(409, "the endpoint is disabled; enable it first (PATCH enabled: true)")
        delivery.status, delivery.finished_at, delivery.next_attempt_at = "pending", None, func.now()
        db.flush()
        db.refresh(delivery)
        return jsonify(_delivery_json(db, delivery)), 202


def _delivery_json(db: Session, delivery: WebhookDelivery) -> dict[str, Any]:
    attempts = db.scalars(
        select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery.id).order_by(WebhookAttempt.number)
    ).all()
    return {
        "id": delivery.id,
        "event_type": delivery.event_type,
        "payload": delivery.payload,
        "status": delivery.status,
        "attempts": [
            {
                "number": a.number,
                "at": iso(a.at),
                "status_code": a.status_code,
                "duration_ms": a.duration_ms,
                "error": a.error,
            }
            for a in attempts
        ],
        "next_attempt_at": iso(delivery.next_attempt_at) if delivery.status == "pending" else None,
        "created_at": iso(delivery.created_at),
        "finished_at": iso(delivery.finished_at),
    }

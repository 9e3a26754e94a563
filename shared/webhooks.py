"""Webhooks: other systems are told when a turn or a replay ends, or a turn
waits for a person, signed as the Standard Webhooks specification says
(the `standardwebhooks` package) and retried over a day.

Each event is a row of webhook_deliveries, written by a Postgres trigger in
the transaction of the change that caused it (the outbox: migration 0015),
so no crash or Redis loss between the change and the sending loses or
doubles one. The webhook worker (tasks/webhooks.py) sends them; this module
holds what both tiers use: the event types, secrets, the check of a URL,
and one attempt's POST.

A URL must be https in production, and its host must not resolve to a
private, loopback, link-local (the clouds' metadata address among them),
shared or reserved address, unless WEBHOOK_ALLOW_PRIVATE is set (for local
use). The check is made when the endpoint is saved and again when each
attempt connects, on the addresses the connection then uses (a name that
resolved to a public address at save time cannot later reach an internal
one). Redirects are not followed, and at most BODY_CAP bytes of an answer
are read.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import secrets
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpcore2
from standardwebhooks import Webhook

from shared.config import get_settings

EVENT_TYPES = (
    "turn.completed",
    "turn.failed",
    "turn.cancelled",
    "turn.interrupted",
    "turn.waiting",
    "replay.finished",
    "schedule.run_finished",
)
BODY_CAP = 4096  # bytes of an answer read, at most: only its status matters
MAX_RETRY_AFTER = 24 * 3600


class Refused(ValueError):
    """A URL webhooks may not be sent to."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def check_url(url: str) -> str:
    """`url` if webhooks may go there; Refused says why not."""
    parts = urlsplit(url)
    s = get_settings()
    if parts.scheme not in ("https", "http"):
        raise Refused("the URL must start with https://")
    if parts.scheme == "http" and s.production and not s.webhook_allow_private:
        raise Refused("the URL must be https in production")
    if not parts.hostname or parts.username or parts.password:
        raise Refused("the URL must name a host, and no user or password")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise Refused(f"the URL's port is not valid: {exc}") from None
    _addresses(parts.hostname, port)
    return url


def _addresses(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, each one allowed; Refused if one is not."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Refused(f"the URL's host {host!r} does not resolve: {exc.strerror}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in found))
    if not get_settings().webhook_allow_private:
        for address in addresses:
            if not _public(address):
                raise Refused(
                    f"the URL's host {host!r} resolves to {address}, a private, loopback, link-local or reserved"
                    " address (WEBHOOK_ALLOW_PRIVATE allows those, for local use)"
                )
    return addresses


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _CheckedBackend(httpcore2.SyncBackend):
    """Connects only to addresses `_addresses` allows, resolving the host
    itself: the address checked is the one connected to. TLS still names
    the host (the connection's server_hostname is the URL's)."""

    def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        try:
            addresses = _addresses(host, port)
        except Refused as exc:
            raise httpcore2.ConnectError(str(exc)) from exc
        error: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, *args, **kwargs)
            except httpcore2.ConnectError as exc:
                error = exc
        raise error or httpcore2.ConnectError(f"{host} has no address")


@functools.cache
def _connections() -> httpcore2.ConnectionPool:
    """The process's connections to receivers (httpcore: it follows no redirect)."""
    return httpcore2.ConnectionPool(
        ssl_context=ssl.create_default_context(),
        network_backend=_CheckedBackend(),
        max_connections=100,
        keepalive_expiry=30.0,
    )


def signature(msg_id: str, at: datetime, body: bytes, secrets_: list[str]) -> str:
    """The webhook-signature header: a `v1,` signature per secret, space-separated."""
    return " ".join(Webhook(secret).sign(msg_id, at, body) for secret in secrets_)


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no answer (a refused URL, a connection error, a timeout)
    error: str | None
    retry_after: float | None  # seconds, from a 429's or 503's Retry-After
    duration_ms: int

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def post(url: str, msg_id: str, body: bytes, secrets_: list[str]) -> Answer:
    """One attempt: POST `body` to `url`, signed with each secret."""
    at = datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "user-agent": "Turnstream-Webhooks",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature(msg_id, at, body, secrets_),
    }
    started = time.monotonic()

    def took() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        check_url(url)
        timeout = get_settings().webhook_timeout
        timeouts = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        with _connections().stream(
            "POST", url, headers=list(headers.items()), content=body, extensions={"timeout": timeouts}
        ) as response:
            read = 0
            for chunk in response.iter_stream():
                read += len(chunk)
                if read >= BODY_CAP:
                    break
            status = response.status
            retry_after = _retry_after(dict(response.headers)) if status in (429, 503) else None
    except Refused as exc:
        return Answer(None, str(exc), None, took())
    except httpcore2.TimeoutException:
        return Answer(
            None, f"no answer within WEBHOOK_TIMEOUT_SECONDS ({get_settings().webhook_timeout:g} s)", None, took()
        )
    except Exception as exc:  # noqa: BLE001 - any failure is this attempt's outcome, recorded and retried
        return Answer(None, f"could not deliver: {exc or type(exc).__name__}", None, took())
    return Answer(status, None if 200 <= status < 300 else f"HTTP {status}", retry_after, took())


def _retry_after(headers: dict[bytes, bytes]) -> float | None:
    """Retry-After in seconds (a number of seconds or an HTTP date), at most a day."""
    value = next((v.decode("latin-1") for k, v in headers.items() if k.lower() == b"retry-after"), None)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def next_wait(attempts: int, answer: Answer) -> float | None:
    """Seconds until the next attempt after `attempts` failed ones
    (WEBHOOK_RETRY_SCHEDULE), or None when the retries have run out. A
    Retry-After longer than the schedule's wait is honoured."""
    schedule = get_settings().webhook_retry_schedule
    if attempts > len(schedule):
        return None
    wait = schedule[attempts - 1]
    return max(wait, answer.retry_after or 0.0)

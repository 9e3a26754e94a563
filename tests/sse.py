"""A small, strict Server-Sent-Events reader over httpx, for tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from shared.events import ENDING_TYPES


@dataclass
class SseEvent:
    event: str
    id: str | None
    data: dict

    @property
    def seq(self) -> int:
        return self.data["seq"]


def iter_sse(response: httpx.Response):
    """Yield SseEvent for messages and ("comment", text) tuples for comments."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if "data" in fields:
                yield SseEvent(fields.get("event", "message"), fields.get("id"), json.loads(fields["data"]))
            fields = {}
        elif line.startswith(":"):
            yield ("comment", line[1:].strip())
        else:
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value


def read_events(
    client: httpx.Client,
    url: str,
    headers: dict | None = None,
    stop_after: int | None = None,
    method: str = "GET",
    json_body: dict | None = None,
    on_event: Callable[[int], object] | None = None,
) -> tuple[httpx.Response, list[SseEvent]]:
    """Read a stream until its terminal event (or stop_after events, or its
    end); return the response and events. on_event(n) runs after the n-th."""
    events: list[SseEvent] = []
    with client.stream(method, url, headers=headers, json=json_body) as response:
        if response.status_code != 200:
            response.read()
            return response, events
        for item in iter_sse(response):
            if isinstance(item, tuple):
                continue
            events.append(item)
            if on_event is not None:
                on_event(len(events))
            if item.event in ENDING_TYPES or (stop_after is not None and len(events) >= stop_after):
                break
    return response, events

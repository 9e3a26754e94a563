"""shared.events.EVENT_TYPES is the event contract: the worker can emit
nothing else, and docs/api.md's table is the schema's own text."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.events import ENDING_TYPES, EVENT_TYPES, EventLog

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"

pytestmark = pytest.mark.fast  # no service: bash deploy/test.sh --fast


def _table() -> str:
    rows = ["| type | data beyond its log's id (`turn_id` or `replay_id`), `seq` and `type` |", "|---|---|"]
    for t in EVENT_TYPES.values():
        if t.name == "session.turn":
            continue  # never sent to a client
        fields = ", ".join(f"`{f}`" for f in t.fields) or "none"
        notes = [t.doc]
        if t.ending:
            notes.append("the stream ends after it")
        if not t.logged:
            notes.append("no `id`")
        rows.append(f"| `{t.name}` | {fields}: {'; '.join(notes)} |")
    return "\n".join(rows) + "\n"


def test_the_api_doc_holds_the_schema_table():
    assert _table() in API_DOC.read_text(), (
        "docs/api.md's event table differs from shared.events.EVENT_TYPES:\n" + _table()
    )


def test_an_event_outside_the_schema_is_refused_before_it_is_sent():
    log = EventLog("turn", "t", client=object())
    assert '"delta":"x"' in log.body("message.delta", {"delta": "x"})
    with pytest.raises(ValueError):
        log.body("message.delta", {"text": "x"})
    with pytest.raises(ValueError):
        log.body("turn.finished", {})


def test_the_ending_types_are_the_ends_of_turns_and_replays():
    assert ENDING_TYPES == {
        "turn.completed",
        "turn.failed",
        "turn.cancelled",
        "turn.interrupted",
        "turn.rolled_back",
        "replay.finished",
    }

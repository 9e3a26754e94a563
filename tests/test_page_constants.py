"""The chat page (web/static/chat.js, no build step) repeats some of the
server's names by hand: the ended statuses, the event types it listens for,
the statuses it draws. These tests read the script and hold those to the
server's own, so a status or event type added there cannot be missed by the
page. They need no service: importing the server's modules opens nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.events import EVENT_TYPES
from shared.turn_states import ENDED, STATUSES
from web.relay.resume import MAX_SEQ

pytestmark = pytest.mark.fast  # no service: bash deploy/test.sh --fast

CHAT_JS = (Path(__file__).resolve().parent.parent / "web" / "static" / "chat.js").read_text()


def _strings(js: str) -> list[str]:
    return re.findall(r'"([^"\\]*)"', js)


def _block(pattern: str) -> str:
    """The text of chat.js that `pattern`'s one group matches."""
    found = re.search(pattern, CHAT_JS, re.S)
    assert found, f"chat.js no longer has {pattern!r}: update this test with the page"
    return found.group(1)


def _keys(js_object: str) -> set[str]:
    """The keys of an object literal, one a line or on one line."""
    return set(re.findall(r"(?:^|,)\s*(\w+):", js_object, re.M))


def turn_stream_types() -> set[str]:
    """The event types a client of a turn's stream can receive, which chat.js
    gets on a session's stream (GET /api/sessions/{id}/events: each turn's
    stream in turn, web/sessions.py).

    - The events of a turn's log: the logged types (`logged=True`), less
      those of a replay's log (`replay.*`, appended by shared/replays.py).
      The worker and the cancel append the rest to the turn's log.
    - `turn.snapshot`: not logged, but sent by the relay (web/relay/resume.py,
      snapshots.py) when the log no longer holds what the client missed.

    Left out: `turn.accepted` opens only `POST /api/chat`'s stream (with
    `stream: true`), made for that one client and never in a log: neither
    GET /api/turns/{id}/events nor a session's stream carries it, and the
    page does not use that endpoint. `session.turn` is published on a
    session's channel, where it tells the relay to follow the next turn; it
    is never sent to a client. `replay.snapshot` is a replay's."""
    logged = {name for name, t in EVENT_TYPES.items() if t.logged and not name.startswith("replay.")}
    return logged | {"turn.snapshot"}


def test_the_ended_statuses_are_the_servers():
    ended = _strings(_block(r"const ENDED = new Set\((\[.*?\])\);"))
    assert len(ended) == len(set(ended))
    assert set(ended) == set(ENDED)


def test_the_page_listens_for_every_type_of_a_turns_stream_and_no_other():
    types = _strings(_block(r"const TURN_EVENTS = (\[.*?\]);"))
    assert len(types) == len(set(types))
    assert set(types) == turn_stream_types()


def test_the_page_handles_each_type_it_listens_for():
    cases = re.findall(r'case "([^"]+)":', _block(r"\n  apply\(type, d\) \{\n(.*?)\n  \}\n"))
    assert set(cases) == turn_stream_types()


def test_the_statuses_the_page_names_are_the_servers():
    assert _keys(_block(r"const line = \{(.*?)\}\[this\.status\];")) == set(STATUSES)  # one line for each
    assert _keys(_block(r"announce\(\{(.*?)\}\[this\.status\]\);")) == set(ENDED)  # said when a turn ends
    compared = re.findall(r'status (?:===|!==) "(\w+)"|status = "(\w+)"|\.end\("(\w+)"', CHAT_JS)
    named = {next(filter(None, groups)) for groups in compared}
    assert named and named <= set(STATUSES)
    ends = set(re.findall(r'\.end\("(\w+)"', CHAT_JS))
    assert ends == set(ENDED)  # the ending events' own statuses


def test_a_session_stream_resumes_after_a_turn_at_the_highest_seq_there_is():
    assert _block(r'const LAST_SEQ = "(\d+)";') == str(MAX_SEQ)

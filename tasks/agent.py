"""The agent loop: stream the model, run the tools it calls, feed the results
back, until it answers without tools or runs out of tool rounds.

Every piece of progress is an event of the turn: `message.delta` for text,
`tool.started` and `tool.finished` for each call, emitted without waiting
(the process's publisher batches them). Each append also reports whether the
turn was cancelled, so the loop stops between deltas and between tool calls;
while tools run, the flag is polled.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from shared import metrics
from shared.assistants import Profile, default_profile
from shared.config import Settings
from shared.events import EventLog
from shared.turn_states import CANCELLED, FAILED, SUCCEEDED
from tasks.model import Completion, ModelError, Stop, StreamBroken, stream_completion
from tasks.tools import Cancelled, Toolbox

log = logging.getLogger(__name__)

EVENT_OUTPUT_CHARS = 2_000  # tool output in events and in the turn's record


@dataclass
class Outcome:
    status: str  # how the attempt ends: a key of shared.turn_states.FINISH
    text: str = ""
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    tools: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, str] | None = None

    def add_usage(self, completion: Completion) -> None:
        for k in self.usage:
            self.usage[k] += completion.usage.get(k, 0)


# The worker's pause before a retry: 0.5, 1, 2, 4, 8, 8 … seconds, plus up to
# a quarter second of jitter.
BACKOFF = wait_exponential_jitter(multiplier=0.5, max=8, jitter=0.25)


def run_agent(
    history: list[dict[str, Any]],
    events: EventLog,
    toolbox: Toolbox,
    settings: Settings,
    attempt: int,
    accepted_at: float | None = None,
    profile: Profile | None = None,
) -> Outcome:
    """Run the turn as `profile` (the default assistant if None): its
    instructions, model and tools. A stream that breaks off midway is run
    again from the start (after `turn.restarted`), at most
    OPENAI_MAX_RETRIES times. `accepted_at` (Unix time) times the first
    token."""
    first_token = _FirstToken(accepted_at)
    profile = profile or default_profile(settings)

    def restart(state: RetryCallState) -> None:
        log.warning("turn %s: %s; restart %d", events.ident, state.outcome.exception(), state.attempt_number)
        metrics.TURN_RESTARTS.labels("model_stream_broke").inc()
        events.emit("turn.restarted", attempt=attempt, reason="model_stream_broke")

    restarts = Retrying(
        retry=retry_if_exception_type(StreamBroken),
        stop=stop_after_attempt(settings.openai_max_retries + 1),
        wait=BACKOFF,
        before_sleep=restart,
        reraise=True,
    )
    try:
        for run in restarts:
            with run:
                if run.retry_state.attempt_number > 1 and events.cancelled:
                    return Outcome(CANCELLED)
                return _Run(profile.messages(history), events, toolbox, settings, first_token, profile).run()
    except ModelError as exc:  # StreamBroken too, once the restarts ran out
        return Outcome(FAILED, error={"code": exc.code, "message": exc.message})


class _FirstToken:
    """Observes the time to the turn's first text, once."""

    __slots__ = ("accepted_at",)

    def __init__(self, accepted_at: float | None) -> None:
        self.accepted_at = accepted_at

    def seen(self) -> None:
        if self.accepted_at is not None:
            metrics.TIME_TO_FIRST_TOKEN.observe(max(time.time() - self.accepted_at, 0.0))
            self.accepted_at = None


class _Run:
    def __init__(
        self,
        history: list[dict[str, Any]],
        events: EventLog,
        toolbox: Toolbox,
        settings: Settings,
        first_token: _FirstToken,
        profile: Profile,
    ) -> None:
        self.messages = list(history)
        self.profile = profile
        self.events = events
        self.toolbox = toolbox
        self.settings = settings
        self.first_token = first_token
        self.outcome = Outcome(SUCCEEDED)

    @property
    def cancelled(self) -> bool:
        return self.events.cancelled

    def emit(self, type_: str, **fields: Any) -> None:
        self.events.emit(type_, **fields)

    def on_delta(self, text: str) -> None:
        if self.first_token.accepted_at is not None:
            self.first_token.seen()
        self.emit("message.delta", delta=text)
        if self.cancelled:
            raise Stop

    def run(self) -> Outcome:
        out = self.outcome
        offer = self.offer = self.toolbox.offer(self.profile)
        if offer.unavailable:  # say so: the answer may lack what those tools would have given
            self.emit("tools.unavailable", servers=offer.unavailable)
        for round_ in range(self.settings.max_tool_rounds + 1):
            completion = stream_completion(self.messages, self.on_delta, offer.specs, self.profile)
            out.add_usage(completion)
            out.text += completion.text
            if completion.stopped or self.cancelled:
                out.status = CANCELLED
                return out
            if not completion.tool_calls:
                return out
            if round_ == self.settings.max_tool_rounds:
                break
            self.messages.append(
                {
                    "role": "assistant",
                    "content": completion.text or None,
                    "tool_calls": [c.as_message() for c in completion.tool_calls],
                }
            )
            if not self.run_tools(completion):
                out.status = CANCELLED
                return out
        out.status = FAILED
        out.error = {
            "code": "tool_rounds_exceeded",
            "message": f"the model still called tools after {self.settings.max_tool_rounds} rounds (MAX_TOOL_ROUNDS)",
        }
        return out

    def run_tools(self, completion: Completion) -> bool:
        """Run one round of tool calls at once; False if the turn was cancelled."""
        calls = completion.tool_calls
        for call in calls:
            self.emit("tool.started", call_id=call.id, name=call.name, arguments=_arguments(call.arguments))
        if self.cancelled:
            return False
        try:
            results = self.toolbox.call_all(
                self.offer, [(c.name, c.arguments) for c in calls], self.events.cancel_requested
            )
        except Cancelled:
            return False
        for call, result in zip(calls, results, strict=True):
            short = _shorten(result.output)
            self.emit("tool.finished", call_id=call.id, name=call.name, ok=result.ok, output=short)
            self.outcome.tools.append(
                {
                    "call_id": call.id,
                    "name": call.name,
                    "arguments": _arguments(call.arguments),
                    "ok": result.ok,
                    "output": short,
                    "duration_ms": result.duration_ms,
                }
            )
            self.messages.append({"role": "tool", "tool_call_id": call.id, "content": result.output})
        return not self.cancelled


def _arguments(text: str) -> Any:
    """Arguments as JSON when they parse, else the text the model wrote."""
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError:
        return text


def _shorten(text: str) -> str:
    return text if len(text) <= EVENT_OUTPUT_CHARS else text[: EVENT_OUTPUT_CHARS - 1] + "…"

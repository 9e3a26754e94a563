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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from shared import metrics
from shared.approvals import APPROVED, EXPIRED, Asked, needs_approval
from shared.assistants import Profile, default_profile
from shared.breakers import Unavailable
from shared.config import Settings
from shared.events import STOP_INTERRUPT, EventLog
from shared.models import new_id
from shared.turn_states import CANCELLED, FAILED, INTERRUPTED, QUEUED, SUCCEEDED, WAITING
from tasks.model import Completion, ModelError, Stop, StreamBroken, ToolCall, stream_completion
from tasks.tools import Cancelled, Toolbox, ToolResult

log = logging.getLogger(__name__)

EVENT_OUTPUT_CHARS = 2_000  # tool output in events and in the turn's record


@dataclass
class Outcome:
    status: str  # how the attempt ends: a key of shared.turn_states.FINISH
    text: str = ""
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    tools: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, str] | None = None
    # A step waiting for a person (status WAITING): where it stopped, and its calls to decide;
    # or (status QUEUED) waiting for its model endpoint's breaker to close: where it stopped, and why.
    paused: dict[str, Any] | None = None
    asked: list[Asked] = field(default_factory=list)
    unavailable: Unavailable | None = None

    def add_usage(self, completion: Completion) -> None:
        for k in self.usage:
            self.usage[k] += completion.usage.get(k, 0)


@dataclass
class Approvals:
    """How a turn meets its assistant's approval policy: the tools allowed
    for its session (read only when a step would ask), and, for a turn that
    waited, the transcript it stopped at, the decisions, and where to
    record progress (so a decided step's calls never run twice)."""

    allowed_for_session: Callable[[], frozenset[str]] = frozenset
    paused: dict[str, Any] | None = None
    decided: dict[str, Any] = field(default_factory=dict)  # call id -> its decision (a ToolApproval)
    checkpoint: Callable[[dict[str, Any]], None] = lambda _: None


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
    approvals: Approvals | None = None,
) -> Outcome:
    """Run the turn as `profile` (the default assistant if None): its
    instructions, model and tools, asking a person where its policy says
    (`approvals`; a turn that waited goes on from where it stopped). A
    stream that breaks off midway is run again from the start of this
    attempt (after `turn.restarted`), at most OPENAI_MAX_RETRIES times.
    `accepted_at` (Unix time) times the first token."""
    first_token = _FirstToken(accepted_at)
    profile = profile or default_profile(settings)
    approvals = approvals or Approvals()

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
                    return Outcome(stopped_as(events))
                return _Run(profile.messages(history), events, toolbox, settings, first_token, profile, approvals).run()
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
        approvals: Approvals,
    ) -> None:
        self.start = len(history)  # the messages after it are this turn's work, kept at a pause
        self.messages = list(history)
        self.profile = profile
        self.approvals = approvals
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
        first = 0
        paused = self.approvals.paused
        if paused is not None:  # go on where the step that waited stopped
            self.messages += paused["messages"]
            out.text, out.usage, out.tools = paused["text"], dict(paused["usage"]), list(paused["tools"])
            self.emit("turn.resumed", text=out.text)
            first = paused["round"] + 1
            if paused["pending"]:
                if not self.run_decided_step(paused):
                    return self.stopped()
        # since when the turn has waited for its model endpoint, across attempts
        delayed_since = (paused or {}).get("delayed_since")
        for round_ in range(first, self.settings.max_tool_rounds + 1):
            try:
                completion = stream_completion(
                    self.messages, self.on_delta, offer.specs, self.profile, self.events.stop_requested
                )
            except Unavailable as exc:  # go on from here once the endpoint is back
                out.status, out.unavailable = QUEUED, exc
                out.paused = self.transcript(round_ - 1, pending=False)
                out.paused["delayed_since"] = delayed_since or time.time()
                return out
            delayed_since = None
            out.add_usage(completion)
            out.text += completion.text
            if completion.stopped or self.cancelled:
                return self.stopped()
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
            asked = self.to_ask(completion.tool_calls)
            if asked:
                out.status, out.paused, out.asked = WAITING, self.transcript(round_, pending=True), asked
                return out
            if not self.run_tools(completion.tool_calls):
                return self.stopped()
        out.status = FAILED
        out.error = {
            "code": "tool_rounds_exceeded",
            "message": f"the model still called tools after {self.settings.max_tool_rounds} rounds (MAX_TOOL_ROUNDS)",
        }
        return out

    def stopped(self) -> Outcome:
        """The turn was asked to stop: its outcome, with the text so far."""
        self.outcome.status = stopped_as(self.events)
        return self.outcome

    def transcript(self, round_: int, *, pending: bool, started: bool = False) -> dict[str, Any]:
        """Where this turn stands, to go on from: its work after the
        history, what it has answered and used so far, and whether the
        last step's calls are still to run (`pending`) or were being run
        (`started`) when this was written."""
        out = self.outcome
        return {
            "messages": self.messages[self.start :],
            "text": out.text,
            "usage": out.usage,
            "tools": out.tools,
            "round": round_,
            "pending": pending,
            "started": started,
        }

    def to_ask(self, calls: list[ToolCall]) -> list[Asked]:
        """The calls of a step a person must decide; none unless the
        assistant's policy asks for some."""
        if (self.profile.approval or {}).get("policy", "never") == "never":
            return []
        allowed = self.approvals.allowed_for_session()
        asked = []
        for call in calls:
            target = self.offer.targets.get(call.name)
            if target is None:  # not offered: refused when run, nothing to decide
                continue
            if needs_approval(self.profile, call.name, call.name in self.offer.read_only, allowed):
                arguments = _arguments(call.arguments)
                asked.append(
                    Asked(
                        new_id(),
                        call.id,
                        call.name,
                        target[0].name,
                        target[1],
                        arguments if isinstance(arguments, dict) else {"_text": arguments},
                        self.offer.schema(call.name),
                    )
                )
        return asked

    def run_decided_step(self, paused: dict[str, Any]) -> bool:
        """Run the calls of the step that waited, as decided; record the
        results before the model is asked again, so that an attempt after
        a crash neither runs them again nor loses them. Calls an attempt
        began and never reported are answered as such, not run again."""
        calls = [
            ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"])
            for c in self.messages[-1]["tool_calls"]
        ]
        round_ = paused["round"]
        if paused.get("started"):
            lost = ToolResult(
                False,
                "the worker running this call stopped before it reported back: it may have run, and was not run again",
                0,
            )
            results = {c.id: lost for c in calls if self._decided_to_run(c)}
        else:
            self.approvals.checkpoint(self.transcript(round_, pending=True, started=True))
            results = {}
        if not self.run_tools(calls, results):
            return False
        after = self.transcript(round_, pending=False)
        self.approvals.checkpoint(after)
        self.approvals.paused = after  # a restart of this attempt goes on from here too
        return True

    def _decided_to_run(self, call: ToolCall) -> bool:
        decision = self.approvals.decided.get(call.id)
        return decision is None or decision.status == APPROVED

    def run_tools(self, calls: list[ToolCall], known: dict[str, ToolResult] | None = None) -> bool:
        """Run one step's tool calls at once, as decided where a person was
        asked (a declined call's result is the person's message); `known`
        holds results not to run for. False if the turn was cancelled."""
        known = dict(known or {})
        decided = self.approvals.decided
        run = []
        for call in calls:
            decision = decided.get(call.id)
            if call.id in known:
                continue
            if decision is not None and decision.status != APPROVED:
                known[call.id] = ToolResult(False, _declined(decision), 0)
                continue
            if decision is not None and decision.decided_arguments is not None:
                call = ToolCall(call.id, call.name, json.dumps(decision.decided_arguments))
            run.append(call)
        for call in run:
            self.emit("tool.started", call_id=call.id, name=call.name, arguments=_arguments(call.arguments))
        if self.cancelled:
            return False
        try:
            results = (
                self.toolbox.call_all(self.offer, [(c.name, c.arguments) for c in run], self.events.stop_requested)
                if run
                else []
            )
        except Cancelled:
            return False
        known.update({call.id: result for call, result in zip(run, results, strict=True)})
        arguments = {call.id: call.arguments for call in run}
        for call in calls:
            result = known[call.id]
            short = _shorten(result.output)
            self.emit("tool.finished", call_id=call.id, name=call.name, ok=result.ok, output=short)
            record = {
                "call_id": call.id,
                "name": call.name,
                "arguments": _arguments(arguments.get(call.id, call.arguments)),
                "ok": result.ok,
                "output": short,
                "duration_ms": result.duration_ms,
            }
            decision = decided.get(call.id)
            if decision is not None:  # who decided, when and what: the turn's history shows it
                record["approval"] = {
                    "request_id": decision.id,
                    "status": decision.status,
                    "decided_by": decision.decided_by,
                    "decided_at": decision.decided_at.isoformat() if decision.decided_at else None,
                    "message": decision.message,
                }
            self.outcome.tools.append(record)
            self.messages.append({"role": "tool", "tool_call_id": call.id, "content": result.output})
        return not self.cancelled


def stopped_as(events: EventLog) -> str:
    """How an attempt asked to stop ends: interrupted by a newer message
    (its answer so far kept), else cancelled (a rolled-back turn's row is
    gone: its end writes nothing either way)."""
    return INTERRUPTED if events.stop_reason() == STOP_INTERRUPT else CANCELLED


def _declined(decision: Any) -> str:
    """What the model is told of a call a person did not allow."""
    if decision.status == EXPIRED:
        return f"This call was not run: no one approved it in time ({decision.message})."
    reason = f": {decision.message}" if decision.message else "."
    return f"This call was not run: the person declined it{reason}"


def _arguments(text: str) -> Any:
    """Arguments as JSON when they parse, else the text the model wrote."""
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError:
        return text


def _shorten(text: str) -> str:
    return text if len(text) <= EVENT_OUTPUT_CHARS else text[: EVENT_OUTPUT_CHARS - 1] + "…"

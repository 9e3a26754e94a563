"""Streaming completions from any OpenAI-compatible server via `openai`."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import openai
from openai import OpenAI, Stream
from opentelemetry.trace import SpanKind

from shared import metrics, overrides, tracing
from shared.assistants import Profile, default_profile
from shared.breakers import CLOSED, Breaker, Unavailable, model_breaker
from shared.broker import send_turns
from shared.config import DEFAULT_ENDPOINT, OFFLINE_MODEL_NAME, OFFLINE_MODEL_OWNER, ModelEndpoint, get_settings, redact
from shared.overrides import httpcore_stoppable, openai_stream
from shared.status import record_model

# Failures of the endpoint, not of the request: these count against its breaker.
BREAKING = frozenset({"model_timeout", "model_unavailable", "model_rate_limited"})


class ModelError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StreamBroken(ModelError):
    """The stream broke off after it had started: the attempt can be redone,
    but the text already sent must be dropped (turn.restarted)."""


class Stop(Exception):
    """Raised by a delta callback to stop streaming (the turn was cancelled)."""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def as_message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Completion:
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    stopped: bool = False


def endpoint(name: str) -> ModelEndpoint:
    """A configured endpoint by name; an assistant saved before the operator
    removed its endpoint fails its turns with a sentence saying so."""
    found = get_settings().model_endpoints.get(name)
    if found is None:
        raise ModelError("model_error", f"the assistant's model endpoint {name!r} is not configured (MODEL_ENDPOINTS)")
    return found


@functools.cache
def get_client(name: str = DEFAULT_ENDPOINT) -> OpenAI:
    """The process's client of one endpoint, shared by its threads (its
    connection pool)."""
    s, where = get_settings(), endpoint(name)
    # The client retries 408/409/429/5xx and connection errors itself, with
    # exponential backoff and jitter; we bound how often.
    client_class = openai_stream.DrainingClient if overrides.enabled("openai_drain") else OpenAI
    retries = _Retries(model_breaker(where.name))
    http_client = openai.DefaultHttpx2Client(
        event_hooks={"request": [retries.on_request], "response": [retries.on_response]}
    )
    if overrides.enabled("httpcore_stoppable"):
        httpcore_stoppable.install(http_client)
    return client_class(
        base_url=where.base_url,
        api_key=where.api_key,
        max_retries=s.openai_max_retries,
        timeout=s.openai_timeout,
        http_client=http_client,
    )


class _Retries:
    """Counts the client's retries by what the request before got, from its
    own HTTP client's hooks: each request says how many retries it is
    (`x-stainless-retry-count`), and each response its status; a retry
    after no response followed a connection error or a timeout. A retry is
    not sent once the endpoint's breaker has opened: the call ends
    Unavailable, and its turn waits in the queue."""

    def __init__(self, breaker: Breaker) -> None:
        self._last = threading.local()
        self._breaker = breaker

    def on_request(self, request: Any) -> None:
        if request.headers.get("x-stainless-retry-count", "0") != "0":
            status = getattr(self._last, "status", None)
            metrics.MODEL_RETRIES.labels("connection" if status is None else f"http_{status}").inc()
            state = self._breaker.state()
            if state["state"] != CLOSED:
                until = state["retry_at"] or time.time()
                raise Unavailable(self._breaker, until, state["last_error"] or "", max(until - time.time(), 0.0))
        self._last.status = None

    def on_response(self, response: Any) -> None:
        self._last.status = response.status_code


class _ModelHealth:
    """What this process last told web about the model (shared/status.py):
    it writes when that changes, and again at most every REFRESH_SECONDS
    (other workers write the same status, and one that stopped may have
    left its word there), so a healthy model costs nearly nothing per turn."""

    REFRESH_SECONDS = 60.0

    def __init__(self) -> None:
        self._ok: bool | None = None
        self._told_at = 0.0
        self._lock = threading.Lock()

    def report(self, error: ModelError | None, **extra: Any) -> None:
        ok, now = error is None, time.monotonic()
        with self._lock:
            if ok is self._ok and not extra and now - self._told_at < self.REFRESH_SECONDS:
                return
            self._ok, self._told_at = ok, now
        record_model(ok=ok, error=None if error is None else error.message, **extra)


_health = _ModelHealth()


class _Unreported:
    """Health for an endpoint that /api/health does not report."""

    @staticmethod
    def report(error: ModelError | None, **extra: Any) -> None:
        pass


def probe_model() -> None:
    """At a worker's start: can the model be reached, and is it the bundled
    offline model (which names itself in its model list)? A server with no
    model list says nothing either way; the first completion will."""
    model = get_settings().openai_model
    try:
        listed = get_client().with_options(max_retries=0, timeout=5.0).models.list()
    except openai.APIConnectionError as exc:
        _health.report(_unreachable(exc, isinstance(exc, openai.APITimeoutError)), offline=False)
    except openai.APIStatusError as exc:
        if exc.status_code == 404:
            record_model(offline=False)
        else:
            _health.report(_refused(exc), offline=False)
    else:
        owners = {m.id: getattr(m, "owned_by", None) for m in listed.data}
        _health.report(None, offline=model == OFFLINE_MODEL_NAME and owners.get(model) == OFFLINE_MODEL_OWNER)


def stream_completion(
    messages: list[dict[str, Any]],
    on_delta: Callable[[str], None],
    tools: list[dict[str, Any]] | None = None,
    profile: Profile | None = None,
    stop: Callable[[], bool] | None = None,
) -> Completion:
    """See _stream_completion; reports the default endpoint's health as it
    changes, and the request's duration and outcome as metrics. `profile`
    (the default assistant if None) says which endpoint, model and sampling;
    `stop()`, asked while the model keeps the thread waiting, ends the
    completion as on_delta's Stop does (shared/overrides/httpcore_stoppable.py)."""
    profile = profile or default_profile(get_settings())
    model = profile.model
    # What /api/health says is the default endpoint's; an assistant's own
    # endpoint failing does not make the default one look down.
    health = _health if profile.endpoint == DEFAULT_ENDPOINT else _Unreported
    breaker = model_breaker(profile.endpoint)
    probe = breaker.before()  # Unavailable while it is open: nothing is sent
    started = time.monotonic()
    outcome = "internal_error"
    with tracing.tracer.start_as_current_span(
        f"chat {model}", kind=SpanKind.CLIENT, attributes={"gen_ai.request.model": model}
    ) as span:
        try:
            answered = functools.partial(_answered, breaker) if probe else None
            result = _stream_completion(messages, on_delta, tools, profile, stop, answered)
            outcome = "stopped" if result.stopped else "ok"
            span.set_attribute("gen_ai.usage.input_tokens", result.usage["prompt_tokens"])
            span.set_attribute("gen_ai.usage.output_tokens", result.usage["completion_tokens"])
        except StreamBroken as exc:  # passing: the attempt is redone, unless the breaker opened
            outcome = "stream_broke"
            wait = breaker.failed(exc.message, probe)
            if wait.open:
                raise wait from exc
            raise
        except ModelError as exc:
            outcome = exc.code
            health.report(exc)
            if exc.code in BREAKING:
                # The endpoint failed (after the client's own retries): the
                # turn waits for it in the queue, up to MODEL_WAIT_SECONDS.
                wait = breaker.failed(exc.message, probe)
                if wait.open or get_settings().model_wait > 0:
                    outcome = "unavailable"
                    raise wait from exc
            elif probe:  # it answered: the request was at fault, not the endpoint
                _answered(breaker)
            raise
        except Unavailable:  # a retry refused: the breaker opened meanwhile
            outcome = "unavailable"
            raise
        finally:
            span.set_attribute("turnstream.outcome", outcome)
            metrics.MODEL_REQUEST.labels(outcome).observe(time.monotonic() - started)
            if outcome not in ("ok", "stopped"):
                metrics.MODEL_ERRORS.labels(outcome).inc()
    health.report(None)
    return result


def _stream_completion(
    messages: list[dict[str, Any]],
    on_delta: Callable[[str], None],
    tools: list[dict[str, Any]] | None,
    profile: Profile,
    stop: Callable[[], bool] | None = None,
    answered: Callable[[], None] | None = None,
) -> Completion:
    """Stream one completion, calling on_delta for every piece of text, and
    gather the tool calls the model makes (their arguments arrive in pieces).

    on_delta may raise Stop; the text so far is kept and `stopped` is set.
    Errors before the first chunk were already retried by the client (429,
    5xx, timeouts, connection errors: exponential backoff with jitter, at
    most OPENAI_MAX_RETRIES times) and raise ModelError; a break after the
    stream started raises StreamBroken. A probe of the endpoint's breaker
    (`answered` given) is sent without retries, and `answered()` is called
    once the answer starts.
    """
    result = Completion()
    parts: list[str] = []
    calls: dict[int, ToolCall] = {}
    started = False
    body: dict[str, Any] = {
        "model": profile.model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if profile.temperature is not None:
        body["temperature"] = profile.temperature
    if profile.max_tokens is not None:
        body["max_tokens"] = profile.max_tokens
    if tools:
        body["tools"] = tools
    where = endpoint(profile.endpoint)
    watch = (
        httpcore_stoppable.watching(stop)
        if stop is not None and overrides.enabled("httpcore_stoppable")
        else contextlib.nullcontext()
    )
    try:
        with watch:
            stream = _chunks(body, where.name, retries=answered is None)
            started = True
            if answered is not None:
                answered()
            with stream:
                for chunk in stream:
                    _take(chunk, result, calls, parts, on_delta)
    except (Stop, httpcore_stoppable.Stopped):
        result.stopped = True
    except openai.APIConnectionError as exc:  # includes APITimeoutError
        timeout = isinstance(exc, openai.APITimeoutError)
        if started:
            raise StreamBroken(
                "model_timeout" if timeout else "model_unavailable", f"the model's stream broke off: {exc}"
            ) from exc
        raise _unreachable(exc, timeout, where) from exc
    except openai.APIStatusError as exc:
        raise _refused(exc, where, profile.model) from exc
    except openai.OpenAIError as exc:
        raise ModelError("model_error", str(exc)) from exc
    except OSError as exc:
        raise StreamBroken("model_unavailable", f"the model's stream broke off: {exc}") from exc
    result.text = "".join(parts)
    result.tool_calls = [calls[i] for i in sorted(calls)]
    for i, call in enumerate(result.tool_calls):
        call.id = call.id or f"call_{i}"
    return result


def _take(
    chunk: Any, result: Completion, calls: dict[int, ToolCall], parts: list[str], on_delta: Callable[[str], None]
) -> None:
    """One chunk of the stream: its usage, its pieces of tool calls, its text."""
    if hasattr(chunk, "model_dump"):  # the client's typed chunks (openai_dict_chunks off)
        chunk = chunk.model_dump()
    if not isinstance(chunk, dict):
        raise ModelError("model_error", f"the model sent a chunk that is not an object: {chunk!r:.200}")
    usage = chunk.get("usage")
    if usage:
        result.usage = {
            "prompt_tokens": usage.get("prompt_tokens") or 0,
            "completion_tokens": usage.get("completion_tokens") or 0,
        }
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        for piece in delta.get("tool_calls") or ():
            call = calls.setdefault(piece.get("index", 0), ToolCall("", "", ""))
            call.id = piece.get("id") or call.id
            function = piece.get("function") or {}
            call.name += function.get("name") or ""
            call.arguments += function.get("arguments") or ""
        content = delta.get("content")
        if content:
            parts.append(content)
            on_delta(content)


def _chunks(body: dict[str, Any], name: str, retries: bool = True) -> Stream[Any]:
    """The completion's chunks: dicts (shared/overrides/openai_stream.py), or
    the client's typed chunks with that override off."""
    client = get_client(name) if retries else get_client(name).with_options(max_retries=0)
    if overrides.enabled("openai_dict_chunks"):
        return openai_stream.dict_chunks(client, body)
    return client.chat.completions.create(**body)


def _answered(breaker: Breaker) -> None:
    """The probe was answered: close the breaker, and send again the turns
    that waited on it."""
    send_turns(breaker.succeeded())


def _unreachable(exc: openai.APIConnectionError, timeout: bool, at: ModelEndpoint) -> ModelError:
    """A model that could not be reached, saying where it was looked for."""
    s = get_settings()
    where = f"the model server at {redact(at.base_url)}"
    if timeout:
        return ModelError("model_timeout", f"{where} did not answer within OPENAI_TIMEOUT ({s.openai_timeout:g} s)")
    return ModelError("model_unavailable", f"could not reach {where} ({exc}): check {at.settings}")


def _refused(exc: openai.APIStatusError, at: ModelEndpoint, model: str) -> ModelError:
    """A model server's error answer, naming the setting that usually causes it."""
    s = get_settings()
    status, where = exc.status_code, f"the model server at {redact(at.base_url)}"
    default = at.name == DEFAULT_ENDPOINT
    key = "OPENAI_API_KEY" if default else f"{at.settings}'s api_key"
    named = f"OPENAI_MODEL ({model!r})" if default else f"the assistant's model ({model!r})"
    retried = f"after OPENAI_MAX_RETRIES ({s.openai_max_retries}) retries"
    detail = _short(exc.message)
    if status == 429:
        return ModelError("model_rate_limited", f"{where} kept answering 429 (rate limited) {retried}: {detail}")
    if status >= 500:
        return ModelError("model_unavailable", f"{where} answered HTTP {status} {retried}: {detail}")
    if status in (401, 403):
        return ModelError("model_error", f"{where} refused the key (HTTP {status}): check {key}. {detail}")
    if status == 404:
        return ModelError(
            "model_error",
            f"{where} answered HTTP 404 for /chat/completions: check {at.settings} (it usually ends in /v1)"
            f" and {named}. {detail}",
        )
    return ModelError("model_error", f"{where} answered HTTP {status}: {detail}")


def _short(text: str, most: int = 300) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"

"""Streaming completions from any OpenAI-compatible server via `openai`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import openai
from openai import OpenAI

from shared.config import get_settings


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


@functools.cache
def get_client() -> OpenAI:
    s = get_settings()
    # The client retries 408/409/429/5xx and connection errors itself, with
    # exponential backoff and jitter; we bound how often.
    return OpenAI(
        base_url=s.openai_base_url,
        api_key=s.openai_api_key,
        max_retries=s.openai_max_retries,
        timeout=s.openai_timeout,
    )


def stream_completion(
    messages: list[dict[str, Any]],
    on_delta: Callable[[str], None],
    tools: list[dict[str, Any]] | None = None,
) -> Completion:
    """Stream one completion, calling on_delta for every piece of text, and
    gather the tool calls the model makes (their arguments arrive in pieces).

    on_delta may raise Stop; the text so far is kept and `stopped` is set.
    Errors before the first chunk were already retried by the client (429,
    5xx, timeouts, connection errors: exponential backoff with jitter, at
    most OPENAI_MAX_RETRIES times) and raise ModelError; a break after the
    stream started raises StreamBroken.
    """
    result = Completion()
    parts: list[str] = []
    calls: dict[int, ToolCall] = {}
    started = False
    try:
        extra = {"tools": tools} if tools else {}
        stream = get_client().chat.completions.create(
            model=get_settings().openai_model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
        started = True
        with stream:
            for chunk in stream:
                if chunk.usage is not None:
                    result.usage = {
                        "prompt_tokens": chunk.usage.prompt_tokens,
                        "completion_tokens": chunk.usage.completion_tokens,
                    }
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta is None:
                        continue
                    for piece in delta.tool_calls or ():
                        call = calls.setdefault(piece.index, ToolCall("", "", ""))
                        call.id = piece.id or call.id
                        if piece.function is not None:
                            call.name += piece.function.name or ""
                            call.arguments += piece.function.arguments or ""
                    if delta.content:
                        parts.append(delta.content)
                        on_delta(delta.content)
    except Stop:
        result.stopped = True
    except openai.APIConnectionError as exc:  # includes APITimeoutError
        timeout = isinstance(exc, openai.APITimeoutError)
        if started:
            raise StreamBroken(
                "model_timeout" if timeout else "model_unavailable", f"the model's stream broke off: {exc}"
            ) from exc
        if timeout:
            raise ModelError("model_timeout", f"the model did not answer in time: {exc}") from exc
        raise ModelError("model_unavailable", f"could not reach the model: {exc}") from exc
    except openai.RateLimitError as exc:
        raise ModelError("model_rate_limited", f"the model kept refusing with 429: {exc}") from exc
    except openai.APIStatusError as exc:
        code = "model_unavailable" if exc.status_code >= 500 else "model_error"
        raise ModelError(code, f"the model answered HTTP {exc.status_code}: {exc.message}") from exc
    except openai.OpenAIError as exc:
        raise ModelError("model_error", str(exc)) from exc
    except OSError as exc:
        raise StreamBroken("model_unavailable", f"the model's stream broke off: {exc}") from exc
    result.text = "".join(parts)
    result.tool_calls = [calls[i] for i in sorted(calls)]
    for i, call in enumerate(result.tool_calls):
        call.id = call.id or f"call_{i}"
    return result

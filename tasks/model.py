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


class Stop(Exception):
    """Raised by a delta callback to stop streaming (the turn was cancelled)."""


@dataclass
class Completion:
    text: str = ""
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


def stream_completion(messages: list[dict[str, Any]], on_delta: Callable[[str], None]) -> Completion:
    """Stream one completion, calling on_delta for every piece of text.

    on_delta may raise Stop; the text so far is kept and `stopped` is set.
    """
    result = Completion()
    parts: list[str] = []
    try:
        stream = get_client().chat.completions.create(
            model=get_settings().openai_model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        with stream:
            for chunk in stream:
                if chunk.usage is not None:
                    result.usage = {
                        "prompt_tokens": chunk.usage.prompt_tokens,
                        "completion_tokens": chunk.usage.completion_tokens,
                    }
                for choice in chunk.choices:
                    text = choice.delta.content if choice.delta else None
                    if text:
                        parts.append(text)
                        on_delta(text)
    except Stop:
        result.stopped = True
    except openai.APITimeoutError as exc:
        raise ModelError("model_timeout", f"the model did not answer in time: {exc}") from exc
    except openai.RateLimitError as exc:
        raise ModelError("model_rate_limited", f"the model kept refusing with 429: {exc}") from exc
    except openai.APIStatusError as exc:
        code = "model_unavailable" if exc.status_code >= 500 else "model_error"
        raise ModelError(code, f"the model answered HTTP {exc.status_code}: {exc.message}") from exc
    except openai.APIConnectionError as exc:
        raise ModelError("model_unavailable", f"could not reach the model: {exc}") from exc
    except openai.OpenAIError as exc:
        raise ModelError("model_error", str(exc)) from exc
    except OSError as exc:  # a connection dropped mid-stream
        raise ModelError("model_unavailable", f"the model's stream broke off: {exc}") from exc
    result.text = "".join(parts)
    return result

"""The offline model through the real openai client: deterministic, configurable, faulty on demand."""

from __future__ import annotations

import json
import time

import openai
import pytest
from openai import OpenAI


@pytest.fixture
def model(stack):
    return OpenAI(base_url=f"http://127.0.0.1:{stack['model_port']}/v1", api_key="x", max_retries=0, timeout=5)


def _stream(model, messages):
    chunks = list(
        model.chat.completions.create(
            model="turnstream-offline", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage


def test_answer_is_deterministic_and_derived_from_the_conversation(model):
    history = [
        {"role": "user", "content": "alpha"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "beta"},
    ]
    text, usage = _stream(model, history)
    assert text == 'You said: "beta". Before that you said: "alpha". This is message 2 of our conversation.'
    assert _stream(model, history)[0] == text
    assert usage.completion_tokens == len(text.split(" ")) and usage.prompt_tokens == 3
    plain = model.chat.completions.create(model="m", messages=history)
    assert plain.choices[0].message.content == text
    assert [m.id for m in model.models.list().data] == ["turnstream-offline"]


def test_token_count_and_delays_are_configurable(model):
    start = time.monotonic()
    text, usage = _stream(model, [{"role": "user", "content": "x [[tokens=20]] [[delay=0.02]] [[first=0.2]]"}])
    elapsed = time.monotonic() - start
    assert usage.completion_tokens == 20 and len(text.split(" ")) == 20
    assert elapsed >= 0.2 + 19 * 0.02


def test_faults_http_status_disconnect_and_stall(model):
    with pytest.raises(openai.RateLimitError):
        _stream(model, [{"role": "user", "content": "[[fault=429]]"}])
    with pytest.raises(openai.InternalServerError):
        _stream(model, [{"role": "user", "content": "[[fault=503]]"}])
    with pytest.raises(openai.APIConnectionError):
        _stream(model, [{"role": "user", "content": "[[fault=disconnect@2]]"}])
    stalled = model.with_options(timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        _stream(stalled, [{"role": "user", "content": "[[fault=stall]]"}])


_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "db__query",
            "parameters": {"type": "object", "properties": {"sql": {"type": "string"}}, "required": ["sql"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "kit__shout",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        },
    },
]


def _tool_calls(model, messages):
    """Stream with tools offered; reassemble the tool calls from their pieces."""
    calls, finish = {}, None
    stream = model.chat.completions.create(model="m", messages=messages, tools=_TOOLS, stream=True)
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for piece in choice.delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": piece.id, "name": "", "arguments": ""})
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish


def test_tool_calls_by_rule_streamed_in_pieces(model):
    calls, finish = _tool_calls(model, [{"role": "user", "content": "count? SELECT count(*) FROM t"}])
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("db__query", {"sql": "SELECT count(*) FROM t"})
    ]
    calls, _ = _tool_calls(model, [{"role": "user", "content": '[[call=shout {"text": "a"}]] [[call=kit__shout]]'}])
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("kit__shout", {"text": "a"}),
        ("kit__shout", {}),
    ]
    assert calls[0]["id"] != calls[1]["id"]
    calls, _ = _tool_calls(model, [{"role": "user", "content": "shout hello"}])
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("kit__shout", {"text": "hello"})]
    calls, finish = _tool_calls(model, [{"role": "user", "content": "nothing to call"}])
    assert calls == [] and finish == "stop"


def test_after_tool_results_the_answer_quotes_them(model):
    messages = [
        {"role": "user", "content": "shout hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "kit__shout", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "HI"},
    ]
    calls, finish = _tool_calls(model, messages)
    assert calls == [] and finish == "stop"
    text, _ = _stream(model, messages)
    assert text.startswith('kit__shout returned: HI. You said: "shout hi".')


def test_fault_sequences_fail_then_succeed(model):
    messages = [{"role": "user", "content": f"seq {time.time()} [[faults=500,429]]"}]
    with pytest.raises(openai.InternalServerError):
        _stream(model, messages)
    with pytest.raises(openai.RateLimitError):
        _stream(model, messages)
    assert _stream(model, messages)[0].startswith('You said: "seq')

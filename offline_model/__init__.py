"""An offline, OpenAI-compatible chat model for tests and local development.

Deterministic: the answer is derived from the conversation it receives, so a
test can tell that history reached the model. Speed and faults are set by
flags (or env), changed at run time with POST /control, or per request by
directives in the last user message:

    [[tokens=N]]        answer with exactly N tokens
    [[first=S]]         first-token delay, seconds
    [[delay=S]]         delay between tokens, seconds
    [[fault=500]]       answer HTTP 500 (any 4xx/5xx status)
    [[fault=disconnect@K]]  drop the connection after K tokens
    [[fault=stall]]     send headers, then nothing

Rules for the answer: 'You said: "<last user message>".', then
'Before that you said: "<previous user message>".' if there is one, then
'This is message <n> of our conversation.'
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

from flask import Flask, Response, jsonify, request

MODEL = "turnstream-offline"
_DIRECTIVE = re.compile(r"\[\[(\w+)=([^\]]*)\]\]")


@dataclass
class Behaviour:
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    fault_rate: float = 0.0
    faults: list[str] = field(default_factory=lambda: ["500", "429", "disconnect@3"])
    seed: int = 0


def answer_for(messages: list[dict]) -> str:
    users = [_text(m.get("content")) for m in messages if m.get("role") == "user"]
    users = [_DIRECTIVE.sub("", u).strip() for u in users]
    if not users:
        return "Hello. Ask me something."
    parts = [f'You said: "{users[-1]}".']
    if len(users) > 1:
        parts.append(f'Before that you said: "{users[-2]}".')
    parts.append(f"This is message {len(users)} of our conversation.")
    return " ".join(parts)


def tokenize(text: str, count: int | None = None) -> list[str]:
    words = text.split(" ")
    tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
    if count is None:
        return tokens
    while len(tokens) < count:
        tokens.append(f" w{len(tokens)}")
    return tokens[:count]


def _text(content) -> str:
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def create_app(behaviour: Behaviour | None = None) -> Flask:
    app = Flask(__name__)
    state = behaviour or Behaviour()
    rng = random.Random(state.seed)
    lock = threading.Lock()

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "turnstream"}]})

    @app.get("/health")
    def health():
        return jsonify({"status": "ok"})

    @app.post("/control")
    def control():
        """Change speed and faults at run time (chaos tests)."""
        for name, value in (request.get_json(silent=True) or {}).items():
            if hasattr(state, name):
                setattr(state, name, value)
        return jsonify(asdict(state))

    @app.post("/v1/chat/completions")
    def completions():
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "messages must be a list")
        messages = body["messages"]
        last = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        directives = dict(_DIRECTIVE.findall(last))
        fault = directives.get("fault")
        if fault is None and state.fault_rate > 0:
            with lock:
                if rng.random() < state.fault_rate:
                    fault = rng.choice(state.faults)
        if fault and fault.isdigit():
            return _error(int(fault), f"injected fault {fault}")
        first = float(directives.get("first", state.first_token_delay))
        delay = float(directives.get("delay", state.token_delay))
        count = int(directives["tokens"]) if "tokens" in directives else None
        tokens = tokenize(answer_for(messages), count)
        usage = {
            "prompt_tokens": sum(len(_text(m.get("content")).split()) for m in messages),
            "completion_tokens": len(tokens),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        cid = "chatcmpl-" + uuid.uuid4().hex[:12]
        model = body.get("model") or MODEL
        if not body.get("stream"):
            time.sleep(first + delay * max(len(tokens) - 1, 0))
            return jsonify(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(tokens)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        disconnect_at = int(fault.split("@")[1]) if fault and fault.startswith("disconnect@") else None

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            data = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return f"data: {json.dumps(data)}\n\n"

        def stream():
            yield chunk({"role": "assistant", "content": ""})
            if fault == "stall":
                time.sleep(3600)
            time.sleep(first)
            for i, token in enumerate(tokens):
                if disconnect_at is not None and i >= disconnect_at:
                    raise ConnectionAbortedError("injected disconnect")  # the server drops the connection
                if i:
                    time.sleep(delay)
                yield chunk({"content": token})
            yield chunk({}, "stop")
            if include_usage:
                data = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"

        return Response(stream(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _error(status: int, message: str):
    response = jsonify({"error": {"message": message, "type": "injected_fault", "code": status}})
    response.status_code = status
    if status == 429:
        response.headers["Retry-After"] = "0"
    return response

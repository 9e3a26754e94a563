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
    [[fault=linger]]    answer, then hold the response open for a minute after [DONE]
    [[echo=setup]]      answer with what it was given: the system prompt, the
                        model, temperature, max_tokens and the tools offered
    [[faults=500,429,disconnect@2]]  the n-th request of this same conversation
                        gets the n-th fault of the list; later ones succeed
                        (so a client's retries can be seen to work)

Rules for the answer: 'You said: "<last user message>".', then
'Before that you said: "<previous user message>".' if there is one, then
'This is message <n> of our conversation.'

Tool calls. When the request offers `tools` and the model has not yet called
tools since the last user message (or fewer rounds than `[[rounds=N]]` asked
for), it calls tools, streamed in OpenAI's format (name first, then the
arguments in pieces), by the first rule that matches the last user message:

    1. [[call=NAME]] or [[call=NAME {"arg": 1}]]: call NAME (the full name, or
       the part after "__") with those arguments; several directives make
       parallel calls.
    2. a SQL statement (from SELECT, WITH or EXPLAIN to the end of the message)
       and a tool named "query": call it, the statement as its first
       string parameter.
    3. a tool's name with its underscores read as spaces ("list tables",
       "describe table orders"): call it; the word after the name, if any,
       fills its first required string parameter.

After tool results, the answer starts with one sentence per result,
'<tool> returned: <output, at most 300 characters>.', then the usual rules.
"""

from __future__ import annotations

import hashlib
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
_CALL = re.compile(r"\[\[call=([\w.-]+)\s*(\{.*?\})?\]\]")
_SQL = re.compile(r"\b(?:SELECT|WITH|EXPLAIN)\b.*", re.IGNORECASE | re.DOTALL)


@dataclass
class Behaviour:
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    fault_rate: float = 0.0
    faults: list[str] = field(default_factory=lambda: ["500", "429", "disconnect@3"])
    seed: int = 0
    faults_injected: int = 0  # by fault_rate, counted for chaos tests
    connections: int = 0  # accepted by the server, counted for tests of connection reuse


def answer_for(messages: list[dict]) -> str:
    users = [_text(m.get("content")) for m in messages if m.get("role") == "user"]
    users = [_DIRECTIVE.sub("", u).strip() for u in users]
    if not users:
        return "Hello. Ask me something."
    summary = _tool_summary(messages)
    parts = [summary] if summary else []
    parts.append(f'You said: "{users[-1]}".')
    if len(users) > 1:
        parts.append(f'Before that you said: "{users[-2]}".')
    parts.append(f"This is message {len(users)} of our conversation.")
    return " ".join(parts)


def setup_of(body: dict) -> str:
    """What the request set up, as text (the `[[echo=setup]]` answer), so a
    test can see which instructions, model and tools reached the model."""
    system = [_text(m.get("content")) for m in body["messages"] if m.get("role") == "system"]
    tools = sorted(t["function"]["name"] for t in body.get("tools") or [] if t.get("type") == "function")
    return (
        f"System: {json.dumps(system)}. Model: {body.get('model')}. Temperature: {body.get('temperature')}."
        f" Max tokens: {body.get('max_tokens')}. Tools: {json.dumps(tools)}."
    )


def _since_last_user(messages: list[dict]) -> list[dict]:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return messages[i + 1 :]
    return messages


def _tool_summary(messages: list[dict]) -> str:
    names = {}
    sentences = []
    for m in _since_last_user(messages):
        for call in m.get("tool_calls") or []:
            names[call.get("id")] = call.get("function", {}).get("name", "tool")
        if m.get("role") == "tool":
            output = " ".join(_text(m.get("content")).split())
            if len(output) > 300:
                output = output[:299] + "…"
            sentences.append(f"{names.get(m.get('tool_call_id'), 'tool')} returned: {output}.")
    return " ".join(sentences)


def plan_tool_calls(messages: list[dict], tools: list[dict], directives: dict[str, str]) -> list[dict]:
    """The tool calls to make now, by the rules in this module's docstring."""
    if not tools:
        return []
    rounds_done = sum(1 for m in _since_last_user(messages) if m.get("role") == "assistant" and m.get("tool_calls"))
    if rounds_done >= int(directives.get("rounds", 1)):
        return []
    last = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    functions = {t["function"]["name"]: t["function"] for t in tools if t.get("type") == "function"}

    def find(name: str) -> dict | None:
        return functions.get(name) or next((f for n, f in functions.items() if n.split("__")[-1] == name), None)

    calls = []
    for name, args in _call_directives(last):
        fn = find(name)
        calls.append({"name": fn["name"] if fn else name, "arguments": args})
    if calls:
        return calls
    plain = _DIRECTIVE.sub("", last).strip()
    sql = _SQL.search(plain)
    query = find("query")
    if sql and query:
        return [{"name": query["name"], "arguments": {_first_string_param(query, required=False): sql.group(0)}}]
    for name, fn in functions.items():
        spoken = name.split("__")[-1].replace("_", " ")
        match = re.search(rf"\b{re.escape(spoken)}\b\s*([\w.]+)?", plain, re.IGNORECASE)
        if match:
            param = _first_string_param(fn, required=True)
            args = {param: match.group(1)} if param and match.group(1) else {}
            return [{"name": name, "arguments": args}]
    return []


def _call_directives(text: str) -> list[tuple[str, dict]]:
    found = []
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\[\[call=([\w.-]+)", text):
        rest = text[match.end() :].lstrip()
        args = {}
        if rest.startswith("{"):
            try:
                args, _end = decoder.raw_decode(rest)
            except json.JSONDecodeError:
                args = {}
        found.append((match.group(1), args))
    return found


def _first_string_param(fn: dict, required: bool) -> str | None:
    schema = fn.get("parameters") or {}
    props = schema.get("properties") or {}
    names = (schema.get("required") or []) if required else list(props)
    return next((n for n in names if (props.get(n) or {}).get("type") == "string"), None)


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
    seen: dict[str, int] = {}  # how often each conversation was asked, for [[faults=...]]

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

    def pick_fault(body: dict, directives: dict[str, str]) -> str | None:
        if "fault" in directives:
            return directives["fault"]
        if "faults" in directives:
            key = hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).hexdigest()
            with lock:
                n = seen[key] = seen.get(key, 0) + 1
            planned = [f.strip() for f in directives["faults"].split(",") if f.strip()]
            return planned[n - 1] if n <= len(planned) else None
        if state.fault_rate > 0:
            with lock:
                if rng.random() < state.fault_rate:
                    state.faults_injected += 1
                    return rng.choice(state.faults)
        return None

    @app.post("/v1/chat/completions")
    def completions():
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "messages must be a list")
        messages = body["messages"]
        tools = body.get("tools") or []
        if not isinstance(tools, list):
            return _error(400, "tools must be a list")
        last = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        directives = dict(_DIRECTIVE.findall(last))
        fault = pick_fault(body, directives)
        if fault and fault.isdigit():
            return _error(int(fault), f"injected fault {fault}")
        first = float(directives.get("first", state.first_token_delay))
        delay = float(directives.get("delay", state.token_delay))
        cid = "chatcmpl-" + uuid.uuid4().hex[:12]
        calls = [
            {
                "id": f"call_{cid[-8:]}_{i}",
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
            }
            for i, c in enumerate(plan_tool_calls(messages, tools, directives))
        ]
        if calls:
            tokens = []
        else:
            count = int(directives["tokens"]) if "tokens" in directives else None
            text = setup_of(body) if directives.get("echo") == "setup" else answer_for(messages)
            tokens = tokenize(text, count)
            if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 0:  # as a model stops at its budget
                tokens = tokens[: body["max_tokens"]]
        usage = {
            "prompt_tokens": sum(len(_text(m.get("content")).split()) for m in messages),
            "completion_tokens": len(tokens) + sum(len(c["function"]["arguments"]) // 4 + 1 for c in calls),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        model = body.get("model") or MODEL
        finish_reason = "tool_calls" if calls else "stop"
        if not body.get("stream"):
            time.sleep(first + delay * max(len(tokens) - 1, 0))
            message = {"role": "assistant", "content": "".join(tokens) or None}
            if calls:
                message["tool_calls"] = calls
            return jsonify(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
                    "usage": usage,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        disconnect_at = int(fault.split("@")[1]) if fault and fault.startswith("disconnect@") else None

        def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            data = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(data)}\n\n"

        def pieces():
            """Each streamed delta: text tokens, or tool calls (name, then arguments in pieces)."""
            for token in tokens:
                yield {"content": token}
            for i, call in enumerate(calls):
                fn = call["function"]
                yield {
                    "tool_calls": [
                        {
                            "index": i,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": fn["name"], "arguments": ""},
                        }
                    ]
                }
                args = fn["arguments"]
                for at in range(0, len(args), 8):
                    yield {"tool_calls": [{"index": i, "function": {"arguments": args[at : at + 8]}}]}

        def stream():
            yield chunk({"role": "assistant", "content": ""})
            if fault == "stall":
                time.sleep(3600)
            time.sleep(first)
            for i, delta in enumerate(pieces()):
                if disconnect_at is not None and i >= disconnect_at:
                    raise ConnectionAbortedError("injected disconnect")  # the server drops the connection
                if i:
                    time.sleep(delay)
                yield chunk(delta)
            yield chunk({}, finish_reason)
            if include_usage:
                yield chunk(None, usage=usage)
            yield "data: [DONE]\n\n"
            if fault == "linger":
                time.sleep(60)

        return Response(stream(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _error(status: int, message: str):
    response = jsonify({"error": {"message": message, "type": "injected_fault", "code": status}})
    response.status_code = status
    if status == 429:
        response.headers["Retry-After"] = "0"
    return response

"""What a question expects of its answer, and the judgement of one answer.

A question of a set may carry `expect`, checked against its turn when its
replay ends and when runs are compared. Each key is one check; a question
passes when its turn succeeded and every check passed (with none, when its
turn succeeded):

    contains / not_contains   text (or a list: each) the answer must / must not hold, case-sensitive
    regex                     a pattern the answer must match somewhere (Python's syntax, the `regex` package)
    json                      true: the answer is a JSON document
    tools_called / tools_not_called
                              tools that must / must not have been called, as `server__tool` or `tool`
    max_latency_ms            from the turn's submission to its end
    max_tokens                prompt and completion tokens of every model call of the turn

Patterns come from callers and run on our processes: each match is bounded
by REGEX_TIMEOUT, and one that takes longer fails its check, saying so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import regex

REGEX_TIMEOUT = 0.1  # seconds one pattern may take on one answer
MAX_PATTERN_CHARS = 1000
KINDS = (
    "contains",
    "not_contains",
    "regex",
    "json",
    "tools_called",
    "tools_not_called",
    "max_latency_ms",
    "max_tokens",
)


@dataclass(frozen=True)
class Result:
    """What a judged turn did: its status, answer, tool names, latency and tokens."""

    status: str
    answer: str | None
    tools: list[str]
    latency_ms: int | None
    tokens: int | None


def pattern_error(pattern: str) -> str | None:
    """Why `pattern` cannot be a question's regex, or None."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"at most {MAX_PATTERN_CHARS} characters"
    try:
        regex.compile(pattern)
    except regex.error as exc:
        return str(exc)
    return None


def judge(expect: dict[str, Any] | None, result: Result) -> list[dict[str, Any]]:
    """One entry per check, in KINDS order: `{"check", "passed", "detail"}`;
    first the turn's own success."""
    answer = result.answer or ""
    checks = [_check("succeeded", result.status == "succeeded", f"the turn {result.status}")]
    for kind in KINDS:
        if not expect or kind not in expect:
            continue
        value = expect[kind]
        if kind in ("contains", "not_contains"):
            texts = [value] if isinstance(value, str) else value
            missing = [t for t in texts if (t in answer) != (kind == "contains")]
            verb = "missing" if kind == "contains" else "present"
            checks.append(_check(kind, not missing, f"{verb}: {', '.join(map(repr, missing))}" if missing else ""))
        elif kind == "regex":
            try:
                found = regex.search(value, answer, timeout=REGEX_TIMEOUT) is not None
                checks.append(_check(kind, found, "" if found else f"no match for {value!r}"))
            except TimeoutError:
                checks.append(_check(kind, False, f"the pattern took over {REGEX_TIMEOUT} s"))
        elif kind == "json":
            checks.append(_check(kind, _is_json(answer), "not JSON"))
        elif kind in ("tools_called", "tools_not_called"):
            wanted = [value] if isinstance(value, str) else value
            bad = [t for t in wanted if _called(t, result.tools) != (kind == "tools_called")]
            verb = "not called" if kind == "tools_called" else "called"
            checks.append(_check(kind, not bad, f"{verb}: {', '.join(bad)}" if bad else ""))
        elif kind == "max_latency_ms":
            ok = result.latency_ms is not None and result.latency_ms <= value
            checks.append(_check(kind, ok, "" if ok else f"{result.latency_ms} ms > {value}"))
        elif kind == "max_tokens":
            ok = result.tokens is not None and result.tokens <= value
            checks.append(_check(kind, ok, "" if ok else f"{result.tokens} tokens > {value}"))
    return checks


def passed(checks: list[dict[str, Any]]) -> bool:
    return all(c["passed"] for c in checks)


def tool_names(tools: list[dict[str, Any]] | None) -> list[str]:
    return [t.get("name", "") for t in tools or []]


def total_tokens(usage: dict[str, Any] | None) -> int | None:
    if not usage:
        return None
    return int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))


def _check(kind: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": kind, "passed": ok, "detail": "" if ok else detail}


def _called(tool: str, names: list[str]) -> bool:
    """`server__tool` names one server's; a bare name, that tool on any server."""
    return any(n == tool or ("__" not in tool and n.split("__", 1)[-1] == tool) for n in names)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True

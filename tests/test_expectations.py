"""Expectations judged on crafted answers (shared/expectations.py)."""

from __future__ import annotations

import pytest

from shared.expectations import Result, judge, passed

pytestmark = pytest.mark.fast

ANSWER = 'Refunds take 30 days. {"ok": true}'


def _result(answer: str = ANSWER, status: str = "succeeded", tools=(), latency_ms=900, tokens=120) -> Result:
    return Result(status=status, answer=answer, tools=list(tools), latency_ms=latency_ms, tokens=tokens)


def _failed(expect: dict, result: Result | None = None) -> list[str]:
    return [c["check"] for c in judge(expect, result or _result()) if not c["passed"]]


@pytest.mark.parametrize(
    ("expect", "failed"),
    [
        ({}, []),
        ({"contains": "30 days"}, []),
        ({"contains": "30 Days"}, ["contains"]),  # case-sensitive
        ({"contains": ["Refunds", "60 days"]}, ["contains"]),  # each of a list
        ({"not_contains": "sorry"}, []),
        ({"not_contains": ["sorry", "Refunds"]}, ["not_contains"]),
        ({"regex": r"\d+ days"}, []),
        ({"regex": r"^\d+ days"}, ["regex"]),
        ({"max_latency_ms": 900}, []),
        ({"max_latency_ms": 899}, ["max_latency_ms"]),
        ({"max_tokens": 120}, []),
        ({"max_tokens": 119}, ["max_tokens"]),
        ({"contains": "nope", "max_tokens": 1}, ["contains", "max_tokens"]),
    ],
)
def test_each_expectation_passes_or_fails_on_the_answer(expect, failed):
    assert _failed(expect) == failed


def test_json_is_the_whole_answer_being_a_document():
    assert _failed({"json": True}, _result('{"refund_days": 30}')) == []
    assert _failed({"json": True}) == ["json"]  # JSON inside prose is not a JSON answer


def test_tools_match_by_full_name_or_by_the_tool_on_any_server():
    result = _result(tools=["sql__query", "files__list_tables"])
    assert _failed({"tools_called": ["query", "files__list_tables"]}, result) == []
    assert _failed({"tools_called": "sql__list_tables"}, result) == ["tools_called"]  # another server's
    assert _failed({"tools_not_called": "query"}, result) == ["tools_not_called"]
    assert _failed({"tools_not_called": ["delete", "sql__list_tables"]}, result) == []
    assert _failed({"tools_called": "query"}, _result(tools=[])) == ["tools_called"]


def test_a_failed_turn_fails_even_with_no_expectations_and_says_why():
    checks = judge(None, _result(answer=None, status="failed", latency_ms=None, tokens=None))
    assert checks == [{"check": "succeeded", "passed": False, "detail": "the turn failed"}]
    assert not passed(checks)
    assert _failed({"max_latency_ms": 5, "max_tokens": 5}, _result(latency_ms=None, tokens=None)) == [
        "max_latency_ms",
        "max_tokens",
    ]


def test_a_catastrophic_pattern_fails_its_check_in_bounded_time():
    import time

    started = time.monotonic()
    checks = judge({"regex": r"(a|aa)+$"}, _result("a" * 40 + "b"))
    assert time.monotonic() - started < 2
    assert checks[-1]["check"] == "regex" and not checks[-1]["passed"] and "took over" in checks[-1]["detail"]


def test_failed_checks_say_what_was_missing():
    checks = judge({"contains": ["30 days", "receipt"], "tools_called": "query"}, _result())
    assert [c["detail"] for c in checks if not c["passed"]] == ["missing: 'receipt'", "not called: query"]


def test_a_questions_change_is_noise_when_its_interval_holds_zero():
    from web.comparisons import _question

    def samples(passes: list[bool]) -> list[dict]:
        return [
            {"message": "q", "answer": "a", "status": "succeeded", "checks": [], "tools": [], "passed": p,
             "latency_ms": 10, "tokens": 5}
            for p in passes
        ]  # fmt: skip

    assert _question("k", samples([True, True, False]), samples([True, False, False]))["change"] == "noise"
    assert _question("k", samples([True, True, True]), samples([False, False, False]))["change"] == "regressed"
    assert _question("k", samples([True]), samples([False]))["change"] == "regressed"  # one sample: as it is
    assert _question("k", samples([False, False]), samples([True, True]))["change"] == "improved"
    assert _question("k", samples([True, False]), samples([False, True]))["change"] == "same"
    assert _question("k", samples([True]), [])["change"] == "removed"


def test_the_interval_of_a_difference_is_welchs():
    from web.comparisons import welch

    # scipy.stats.ttest_ind([2, 4, 6, 8], [1, 2, 3, 4], equal_var=False).confidence_interval()
    assert welch([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx([-1.3642, 6.3642], abs=1e-3)
    assert welch([1], [2, 3]) is None
    assert welch([1, 1], [3, 3]) == [2, 2]

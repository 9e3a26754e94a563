"""A comparison (web/comparisons.py) as CSV, and as one self-contained HTML
report: every question with its word diff and checks, a "regressions only"
filter, and latency and token charts drawn by Plotly, whose script is
written into the page (nothing is fetched when it is opened)."""

from __future__ import annotations

import csv
import io
import json
import secrets
from collections.abc import Iterator
from typing import Any

from flask import current_app

CSV_COLUMNS = (
    "key",
    "message",
    "change",
    "baseline_pass_rate",
    "candidate_pass_rate",
    "baseline_latency_ms",
    "candidate_latency_ms",
    "baseline_tokens",
    "candidate_tokens",
    "baseline_tools",
    "candidate_tools",
    "baseline_failed_checks",
    "candidate_failed_checks",
    "baseline_answer",
    "candidate_answer",
)


def to_csv(comparison: dict[str, Any]) -> str:
    """One row per question."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for q in comparison["questions"]:
        row = [q["key"], q["message"], q["change"]]
        for field in ("pass_rate", "latency_ms", "tokens", "tools", "checks", "answer"):
            for side in ("baseline", "candidate"):
                outcome = q[side]
                value = outcome[field] if outcome else None
                if field == "tools" and value is not None:
                    value = " ".join(value)
                elif field == "checks" and value is not None:
                    value = "; ".join(f"{c['check']}: {c['detail']}" for c in value if not c["passed"])
                row.append("" if value is None else value)
        writer.writerow(row)
    return out.getvalue()


def to_html(comparison: dict[str, Any]) -> tuple[str, str]:
    """The report, and the nonce its scripts carry (for a Content-Security-Policy)."""
    pieces, nonce = html_pieces(comparison)
    return "".join(pieces), nonce


def html_pieces(comparison: dict[str, Any]) -> tuple[Iterator[str], str]:
    """The report as it is rendered, in pieces (a response
    streams them: a web process's other requests go on between them), and
    its scripts' nonce."""
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    nonce = secrets.token_urlsafe(16)
    charts = {}
    for metric, title, unit in (
        ("latency_ms", "Latency per question", "ms"),
        ("tokens", "Tokens per question", "tokens"),
    ):
        figure = go.Figure(
            layout={"title": title, "barmode": "overlay", "xaxis": {"title": unit}, "template": "simple_white"}
        )
        for side in ("baseline", "candidate"):
            values = [q[side][metric] for q in comparison["questions"] if q[side] and q[side][metric] is not None]
            figure.add_trace(go.Histogram(x=values, name=side, opacity=0.6))
        charts[metric] = _script_json(figure.to_json())
    stream = current_app.jinja_env.get_template("comparison.html").stream(
        dict(
            c=comparison,
            charts=charts,
            plotly_js=get_plotlyjs(),
            nonce=nonce,
            fmt=_number,
            metrics=(
                ("pass_rate", "pass rate"),
                ("p50_latency_ms", "p50 latency ms"),
                ("p95_latency_ms", "p95 latency ms"),
                ("mean_tokens", "tokens per question"),
            ),
        )
    )
    stream.enable_buffering(2000)  # template pieces sent at a time
    return stream, nonce


def _number(value: Any, signed: bool = False) -> str:
    """A figure for a person: "-" when there is none."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 or float(value).is_integer() else f"{value:.3f}".rstrip("0")
    return f"+{text}" if signed and value > 0 else text


def _script_json(text: str) -> str:
    """JSON safe inside a <script> element: no `</script>` or comment can end it."""
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def to_json(comparison: dict[str, Any]) -> str:
    return json.dumps(comparison)

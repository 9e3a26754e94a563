"""Print a benchmark's table and write its figures as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def report(rows: list[tuple[str, Any]], results: dict, out: str) -> None:
    width = max(len(label) for label, _value in rows)
    print()
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {path}")

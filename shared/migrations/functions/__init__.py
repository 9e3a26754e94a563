"""Postgres functions, one .sql file per version: `<name>.v<N>.sql`.

A migration that creates or changes a function loads the version it
introduces (its downgrade, the version before); a file is never edited once
a migration loads it. The highest version of each is the function's current
text, which tests/test_functions.py compares with the migrated database.
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).parent


def function_sql(name: str, version: int) -> str:
    """The CREATE OR REPLACE FUNCTION statement of one version."""
    return (HERE / f"{name}.v{version}.sql").read_text()


def current_versions() -> dict[str, int]:
    """Each function's newest version."""
    newest: dict[str, int] = {}
    for path in HERE.glob("*.v*.sql"):
        name, version = re.fullmatch(r"(\w+)\.v(\d+)\.sql", path.name).groups()
        newest[name] = max(newest.get(name, 0), int(version))
    return newest

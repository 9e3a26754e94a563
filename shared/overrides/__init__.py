"""Where Turnstream reaches into a library's internals, one module each.

Each module says which upstream version it targets, why it exists (what the
library's own behaviour cost, measured) and the upstream issue where there
is one, and tests/test_overrides.py holds a test per module that fails when
the upstream behaviour it relies on changes. LIBRARY_OVERRIDES lists those
applied: `all` (the default), `none`, or names from OVERRIDES below.
"""

from __future__ import annotations

from shared.config import get_settings


def enabled(name: str) -> bool:
    """Whether the override `name` (a module of this package) is applied."""
    return name in get_settings().library_overrides

"""Run Alembic migrations programmatically (release step, tests, set-up)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

_DIR = Path(__file__).parent / "migrations"


def alembic_config() -> Config:
    return Config(str(_DIR / "alembic.ini"))


def upgrade(revision: str = "head") -> None:
    command.upgrade(alembic_config(), revision)

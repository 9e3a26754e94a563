"""Assistants: who answers a turn. The worker reads the version a turn was
accepted with (shared/models.py, submit_turn()); versions never change once
made, so each process keeps the ones it read.

A session or replay that names none gets the default assistant: the
operator's settings (OPENAI_MODEL on the `default` endpoint, every
configured tool, no instructions), so nothing changes for a caller that
never names one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, select

from shared.config import DEFAULT_ENDPOINT, Settings
from shared.db import autocommit_engine
from shared.models import Assistant, AssistantVersion

ALL_TOOLS = "*"  # in a server's allowlist: every tool it has
APPROVAL_POLICIES = ("never", "always", "tools")


@dataclass(frozen=True)
class Profile:
    """What a turn runs with."""

    assistant_id: str | None  # None: the default assistant
    version: int | None
    name: str
    instructions: str
    endpoint: str  # a name of Settings.model_endpoints
    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    # MCP server -> the tools it may offer (ALL_TOOLS: every one); None: every configured server's every tool
    tools: dict[str, list[str]] | None = None
    approval: dict[str, Any] = field(default_factory=lambda: {"policy": "never"})

    @property
    def label(self) -> str:
        """How logs and Flower name it."""
        return self.name if self.assistant_id is None else f"{self.name} v{self.version}"

    def allows(self, server: str, tool: str) -> bool:
        """Whether the model may be offered this server's tool."""
        if self.tools is None:
            return True
        allowed = self.tools.get(server)
        return allowed is not None and (ALL_TOOLS in allowed or tool in allowed)

    def messages(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """What the model is sent: its instructions first, then the session."""
        if not self.instructions:
            return list(history)
        return [{"role": "system", "content": self.instructions}, *history]


def default_profile(settings: Settings) -> Profile:
    return Profile(None, None, "default", "", DEFAULT_ENDPOINT, settings.openai_model)


_VERSION = (
    select(
        Assistant.name,
        AssistantVersion.instructions,
        AssistantVersion.endpoint,
        AssistantVersion.model,
        AssistantVersion.temperature,
        AssistantVersion.max_tokens,
        AssistantVersion.tools,
        AssistantVersion.approval,
    )
    .join(Assistant, Assistant.id == AssistantVersion.assistant_id)
    .where(AssistantVersion.assistant_id == bindparam("assistant_id"), AssistantVersion.version == bindparam("version"))
)


@functools.lru_cache(maxsize=1024)
def load_profile(assistant_id: str, version: int) -> Profile | None:
    """One version, read once per process by its primary key; None if its
    assistant was deleted."""
    with autocommit_engine().connect() as db:
        row = db.execute(_VERSION, {"assistant_id": assistant_id, "version": version}).one_or_none()
    if row is None:
        return None
    return Profile(assistant_id, version, *row)

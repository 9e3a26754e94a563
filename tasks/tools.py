"""MCP tools for the agent.

The MCP SDK is asyncio while the worker's turns run in pool threads, so each
worker process keeps one asyncio loop in a background thread. Every configured
server gets one long-lived `mcp.Client` there, opened on first use and reused
by every turn of the process; turns call into the loop and wait for results.

Each client lives inside one asyncio task from open to close, because the
SDK's transports (anyio task groups) must be entered and left by the same
task. A server whose connection closes (a stdio server that crashed, an HTTP
server that went away) is marked closed and opened again on its next use.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx2
import mcp_types
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from opentelemetry import context as otel_context

from shared import metrics, tracing
from shared.assistants import Profile
from shared.breakers import Breaker, Unavailable, tool_breaker
from shared.config import get_settings, redact
from shared.status import record_tool_server

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 20.0  # seconds to start a server and list its tools
RETRY_AFTER_FAILURE = 15.0  # a server that failed to open is not retried sooner
MODEL_OUTPUT_CHARS = 20_000  # tool output beyond this is cut before it reaches the model
_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_-]")


class Cancelled(Exception):
    """The turn was cancelled while its tools ran."""


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    output: str
    duration_ms: int
    broke: bool = False  # the server failed (not the tool): counts against its breaker


@dataclass(frozen=True)
class Offer:
    """One turn's tools: only these may be called in it."""

    specs: list[dict[str, Any]]  # OpenAI function tools
    unavailable: list[dict[str, str]]  # {name, error} of each configured server left out
    targets: dict[str, tuple[_Server, str]] = field(default_factory=dict)  # a spec's name -> (server, tool)
    read_only: frozenset[str] = frozenset()  # names of tools that say they change nothing (readOnlyHint)

    def schema(self, name: str) -> dict[str, Any]:
        """The input schema of an offered tool, by the name the model used."""
        return next((s["function"]["parameters"] for s in self.specs if s["function"]["name"] == name), {})


def tool_name(server: str, tool: str) -> str:
    """The name the model sees: `<server>__<tool>`, in OpenAI's alphabet."""
    return _NAME_CHARS.sub("_", f"{server}__{tool}")[:64]


class _Server:
    """One configured MCP server and its open client, owned by the loop thread."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.name = name
        self.config = config
        self.client: Client | None = None
        self.tools: list[mcp_types.Tool] = []
        self.failed_at = 0.0
        self.error: str | None = None  # why it last failed to open
        self._closing: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> bool:
        """Open the client unless it is open; False when the server is unavailable."""
        async with self._lock:
            if self.client is not None:
                return True
            if time.monotonic() - self.failed_at < RETRY_AFTER_FAILURE:
                return False
            ready = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._hold(ready), name=f"mcp:{self.name}")
            try:
                await asyncio.wait_for(asyncio.shield(ready), CONNECT_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - any failure leaves the server out for now
                self.error = _describe_failure(self.config, exc)
                log.warning("MCP server %r is unavailable: %s", self.name, self.error)
                self.failed_at = time.monotonic()
                self._task.cancel()
                record_tool_server(self.name, self.error)
                return False
            self.error = None
            record_tool_server(self.name, None, len(self.tools))
            return True

    async def _hold(self, ready: asyncio.Future) -> None:
        """Open the client, publish it, and keep it open until closed."""
        self._closing = closing = asyncio.Event()
        try:
            async with AsyncExitStack() as stack:
                client = await stack.enter_async_context(Client(await self._transport(stack), mode="auto"))
                tools, cursor = [], None
                while True:
                    page = await client.list_tools(cursor=cursor)
                    tools.extend(page.tools)
                    cursor = page.next_cursor
                    if not cursor:
                        break
                self.tools, self.client = tools, client
                log.info("MCP server %r open with %d tools", self.name, len(tools))
                ready.set_result(None)
                await closing.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
            if not isinstance(exc, (Exception, asyncio.CancelledError)):
                raise
        finally:
            self.client = None

    async def _transport(self, stack: AsyncExitStack) -> Any:
        cfg = self.config
        if "command" in cfg:
            return StdioServerParameters(
                command=cfg["command"], args=list(cfg.get("args") or []), env=cfg.get("env"), cwd=cfg.get("cwd")
            )
        http = await stack.enter_async_context(
            httpx2.AsyncClient(headers=cfg.get("headers") or {}, timeout=httpx2.Timeout(30.0, read=300.0))
        )
        return streamable_http_client(cfg["url"], http_client=http)

    def close(self) -> None:
        if self._closing is not None:
            self._closing.set()
        self.client = None

    async def call(self, tool: str, arguments: dict[str, Any], timeout: float) -> ToolResult:
        start = time.monotonic()

        def done(ok: bool, output: str) -> ToolResult:
            return ToolResult(ok, output, int((time.monotonic() - start) * 1000))

        def broke(output: str) -> ToolResult:
            return ToolResult(False, output, int((time.monotonic() - start) * 1000), broke=True)

        if not await self.open():
            return broke(f"the tool server {self.name!r} is unavailable")
        client = self.client
        try:
            # The SDK's own timeout sends the server a cancellation; wait_for
            # is the backstop should a transport hang outside a request.
            result = await asyncio.wait_for(
                client.call_tool(tool, arguments, read_timeout_seconds=timeout), timeout + 5
            )
        except (MCPError, TimeoutError) as exc:
            code = getattr(exc, "code", mcp_types.REQUEST_TIMEOUT)
            if code == mcp_types.REQUEST_TIMEOUT:
                return broke(f"the tool did not answer within {timeout:g} seconds")
            if code == mcp_types.CONNECTION_CLOSED:
                self.close()  # opened again on next use
                return broke(f"the tool server {self.name!r} closed the connection; it restarts on next use")
            return done(False, f"the tool failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - a tool's failure goes back to the model, never fails the turn
            self.close()
            return broke(f"the tool server {self.name!r} failed: {exc}")
        return done(not result.is_error, _output_text(result))


def _gate(server: str, calls: int) -> bool | Unavailable:
    """Ask the server's breaker for `calls` calls: True to go as its probe,
    False to go, or why not."""
    try:
        return tool_breaker(server).before(calls)
    except Unavailable as exc:
        return exc


def _account(breaker: Breaker, results: list[ToolResult], probe: bool) -> None:
    """Tell the breaker how its server's calls went: each failure of the
    server counts; a probe that reached the server closes it."""
    broken = [r for r in results if r.broke]
    for i, result in enumerate(broken):
        breaker.failed(result.output, probe and i == 0)
    if probe and not broken:
        breaker.succeeded()


def _refused(exc: Unavailable) -> ToolResult:
    retry_at = time.strftime("%H:%M:%S UTC", time.gmtime(exc.until))
    return ToolResult(
        False,
        f"the tool server {exc.breaker.name!r} is unavailable: its recent calls failed (the last: {exc.error})."
        f" It is tried again after {retry_at}; answer without it or say it is unavailable.",
        0,
    )


def _describe_failure(config: dict[str, Any], exc: BaseException) -> str:
    """Why a server did not open, with what was tried."""
    tried = f"command {config['command']!r}" if "command" in config else f"URL {redact(config['url'])}"
    if isinstance(exc, TimeoutError):
        return f"{tried} did not answer within {CONNECT_TIMEOUT:g} seconds"
    return f"{tried} failed: {exc or type(exc).__name__}"


def _output_text(result: mcp_types.CallToolResult) -> str:
    parts = []
    for block in result.content:
        text = getattr(block, "text", None)
        parts.append(text if text is not None else f"[{block.type}]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, default=str))
    text = "\n".join(parts)
    return text if len(text) <= MODEL_OUTPUT_CHARS else text[:MODEL_OUTPUT_CHARS] + "\n[output cut]"


class Toolbox:
    """The worker process's MCP servers, callable from any thread."""

    def __init__(self, servers: dict[str, dict[str, Any]], timeout: float) -> None:
        self.timeout = timeout
        self._configs = servers
        self._servers: dict[str, _Server] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start = threading.Lock()

    def _run(self, coro: Any) -> Any:
        """Run a coroutine on the loop thread and return its future."""
        with self._start:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="mcp-loop", daemon=True).start()
                self._servers = {n: _Server(n, c) for n, c in self._configs.items()}
                self._loop = loop
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def offer(self, profile: Profile) -> Offer:
        """The tools the assistant may use, as OpenAI function tools, and
        the servers it may use that could not be opened. A server it may not
        use is not even opened."""
        if not self._configs or profile.tools == {}:
            return Offer([], [])
        return self._run(self._offer(profile)).result()

    async def _offer(self, profile: Profile) -> Offer:
        servers = [s for s in self._servers.values() if profile.tools is None or s.name in profile.tools]
        await asyncio.gather(*(s.open() for s in servers))
        specs, names, unavailable, read_only = [], {}, [], set()
        for server in servers:
            if server.client is None:
                unavailable.append({"name": server.name, "error": server.error or "unavailable"})
                continue
            for tool in server.tools:
                if not profile.allows(server.name, tool.name):
                    continue
                name = tool_name(server.name, tool.name)
                names[name] = (server, tool.name)
                if tool.annotations is not None and tool.annotations.read_only_hint:
                    read_only.add(name)
                specs.append(
                    {
                        "type": "function",
                        "function": {
                            "name": name,
                            "description": tool.description or "",
                            "parameters": tool.input_schema,
                        },
                    }
                )
        return Offer(specs, unavailable, names, frozenset(read_only))

    def call_all(self, offer: Offer, calls: list[tuple[str, str]], cancelled: Callable[[], bool]) -> list[ToolResult]:
        """Run (name, JSON arguments) calls of the offer's tools at once;
        raise Cancelled as soon as `cancelled()` turns true, stopping the
        calls still running. A call to a server whose breaker is open is not
        made: its result tells the model the server is unavailable."""
        servers = [None if offer.targets.get(name) is None else offer.targets[name][0].name for name, _ in calls]
        gates = {server: _gate(server, servers.count(server)) for server in set(servers) - {None}}
        going = [i for i, server in enumerate(servers) if not isinstance(gates.get(server), Unavailable)]
        future = self._run(self._call_all(offer, [calls[i] for i in going], otel_context.get_current()))
        while True:
            try:
                ran = dict(zip(going, future.result(timeout=0.2), strict=True))
                break
            except TimeoutError:
                if cancelled():
                    future.cancel()
                    raise Cancelled from None
        for server, gate in gates.items():
            if not isinstance(gate, Unavailable):
                _account(tool_breaker(server), [ran[i] for i in going if servers[i] == server], gate)
        return [ran[i] if i in ran else _refused(gates[server]) for i, server in enumerate(servers)]

    async def _call_all(
        self, offer: Offer, calls: list[tuple[str, str]], trace_context: otel_context.Context
    ) -> list[ToolResult]:
        """Run on the toolbox's loop thread: each call's span continues the
        turn's trace from the caller's context."""

        async def traced(name: str, args: str) -> ToolResult:
            with tracing.tracer.start_as_current_span(f"tool {name}", context=trace_context) as span:
                result = await self._call(offer, name, args)
                span.set_attribute("turnstream.tool.ok", result.ok)
                return result

        return list(await asyncio.gather(*(traced(name, args) for name, args in calls)))

    async def _call(self, offer: Offer, name: str, arguments: str) -> ToolResult:
        target = offer.targets.get(name)
        if target is None:  # a name the model made up, or a tool not offered: counted under none of its own
            metrics.TOOL_ERRORS.labels("", "unknown").inc()
            return ToolResult(False, f"there is no tool named {name!r}", 0)
        server, tool = target
        try:
            args = json.loads(arguments or "{}")
        except json.JSONDecodeError as exc:
            result = ToolResult(False, f"the arguments are not valid JSON: {exc}", 0)
        else:
            if isinstance(args, dict):
                result = await server.call(tool, args, self.timeout)
                metrics.TOOL_CALL.labels(server.name, tool).observe(result.duration_ms / 1000)
            else:
                result = ToolResult(False, "the arguments must be a JSON object", 0)
        if not result.ok:
            metrics.TOOL_ERRORS.labels(server.name, tool).inc()
        return result

    def close(self) -> None:
        """Close every server (stdio servers exit), at worker shutdown."""
        if self._loop is None:
            return

        async def close_all() -> None:
            tasks = [s._task for s in self._servers.values() if s._task is not None]
            for server in self._servers.values():
                server.close()
            if tasks:
                await asyncio.wait(tasks, timeout=5)

        self._run(close_all()).result(timeout=10)


@functools.cache
def get_toolbox() -> Toolbox:
    s = get_settings()
    return Toolbox(s.mcp_servers, s.tool_timeout)

"""A second, independent MCP server for the tests, over stdio or HTTP:

python -m tests.mcp_tools            (stdio)
python -m tests.mcp_tools --port N   (streamable HTTP at /mcp)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("turnstream-test-kit")


@server.tool()
def shout(text: str) -> str:
    """Say the text back in capitals."""
    return text.upper()


@server.tool()
async def nap(seconds: float) -> str:
    """Sleep, then say how long; a slow tool."""
    await asyncio.sleep(seconds)
    return f"napped {seconds:g}s"


@server.tool()
def explode(reason: str = "") -> str:
    """Always fails, as a tool error."""
    raise ToolError(f"exploded {reason}".strip())


@server.tool()
def die() -> str:
    """Exit the server process mid-call (a crash)."""
    os._exit(3)


@server.tool()
def pid() -> str:
    """This server's process id and start time (to see restarts)."""
    return f"{os.getpid()}@{START}"


START = time.time()

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.port:
        server.run("streamable-http", host="127.0.0.1", port=args.port)
    else:
        server.run()

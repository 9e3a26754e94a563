"""MCP servers that ship with Turnstream (run as subprocesses of the worker)."""

"""Configuration is read once, validated, and fails with a sentence naming the variable."""

from __future__ import annotations

import json

import pytest

from shared.config import ConfigError, Settings


def test_defaults_run_everything_locally_with_the_offline_model():
    s = Settings.from_env({})
    assert s.database_url.startswith("postgresql+psycopg://") and "127.0.0.1" in s.database_url
    assert s.redis_url.startswith("redis://127.0.0.1")
    assert s.offline_model and s.openai_base_url.startswith("http://127.0.0.1")
    assert not s.auth_enabled


def test_platform_urls_are_accepted_as_handed_out():
    s = Settings.from_env({"DATABASE_URL": "postgres://u:p@db.example:5432/app", "REDIS_URL": "rediss://:pw@r:6380"})
    assert s.database_url == "postgresql+psycopg://u:p@db.example:5432/app"
    assert s.broker_url == "rediss://:pw@r:6380?ssl_cert_reqs=required"


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://nope"}, "REDIS_URL"),
        ({"PORT": "eighty"}, "PORT"),
        ({"WORKER_CONCURRENCY": "0"}, "WORKER_CONCURRENCY"),
        ({"AUTH": "maybe"}, "AUTH"),
        ({"MCP_SERVERS": "{bad json"}, "MCP_SERVERS"),
        ({"MCP_SERVERS": json.dumps({"mcpServers": {"x": {"args": []}}})}, "MCP_SERVERS"),
        ({"MCP_SERVERS": json.dumps({"a__b": {"command": "python"}})}, "MCP_SERVERS"),
        ({"MCP_SERVERS": json.dumps({"sql": {"command": "python", "args": "-m x"}})}, "MCP_SERVERS"),
        ({"TOOL_TIMEOUT_SECONDS": "0"}, "TOOL_TIMEOUT_SECONDS"),
        ({"MAX_TOOL_ROUNDS": "many"}, "MAX_TOOL_ROUNDS"),
        ({"TURNSTREAM_ENV": "production", "FLOWER_BASIC_AUTH": "a:b"}, "SECRET_KEY"),
    ],
)
def test_bad_values_stop_with_a_sentence_naming_the_variable(env, name):
    with pytest.raises(ConfigError) as exc:
        Settings.from_env(env)
    assert name in str(exc.value)


def test_production_refuses_to_run_with_auth_off():
    env = {"TURNSTREAM_ENV": "production", "SECRET_KEY": "s", "FLOWER_BASIC_AUTH": "a:b", "AUTH": "off"}
    with pytest.raises(ConfigError, match="AUTH=off"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "AUTH": "on"}).auth_enabled


def test_mcp_servers_from_json_or_a_yaml_file(tmp_path):
    config = {"mcpServers": {"sql": {"command": "python", "args": ["-m", "x"]}, "docs": {"url": "http://h/mcp"}}}
    assert set(Settings.from_env({"MCP_SERVERS": json.dumps(config)}).mcp_servers) == {"sql", "docs"}
    path = tmp_path / "mcp.yaml"
    path.write_text("sql:\n  command: python\n")
    assert Settings.from_env({"MCP_SERVERS": str(path)}).mcp_servers == {"sql": {"command": "python"}}


def test_shared_imports_neither_web_nor_tasks_and_modules_read_nothing_at_import():
    import ast
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    for path in (root / "shared").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] in ("web", "tasks") for n in names), path
    # importing every tier with a broken environment must not fail: nothing is read at import
    code = "import web, tasks, shared.events, shared.turns, shared.replays; web.create_app"
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "broken", "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True)

"""Configuration is read once, validated, and fails with a sentence naming the variable."""

from __future__ import annotations

import json
import re

import pytest

from shared.config import OFFLINE_MODEL_NAME, ConfigError, Settings, cookie_signing_key, is_loopback, redact

SECRET = "s" * 32
DEV = {"TURNSTREAM_ENV": "development"}

pytestmark = pytest.mark.fast  # no service: bash deploy/test.sh --fast


def test_defaults_run_everything_locally_with_the_offline_model_and_authentication_on():
    s = Settings.from_env({})
    assert s.env == "production" and s.auth_enabled  # nothing unsafe by omission
    assert s.database_url.startswith("postgresql+psycopg://") and "127.0.0.1" in s.database_url
    assert s.redis_url.startswith("redis://127.0.0.1")
    assert s.openai_model == OFFLINE_MODEL_NAME and s.openai_base_url.startswith("http://127.0.0.1")


def test_authentication_is_off_only_when_local_development_is_chosen():
    assert not Settings.from_env(DEV).auth_enabled
    assert Settings.from_env({**DEV, "AUTH": "on", "SECRET_KEY": SECRET}).auth_enabled
    for env in ({"AUTH": "off"}, {"AUTH": "off", "TURNSTREAM_ENV": "production", "SECRET_KEY": SECRET}):
        with pytest.raises(ConfigError, match="AUTH=off is refused unless TURNSTREAM_ENV=development"):
            Settings.from_env(env)


@pytest.mark.parametrize("secret", [None, "", "short", "x" * 31])
def test_a_signed_cookie_needs_a_long_secret_key(secret):
    env = {} if secret is None else {"SECRET_KEY": secret}
    for base in ({}, {**DEV, "AUTH": "on"}):
        settings = Settings.from_env({**base, **env})  # what workers, beat and Flower need: no cookie key
        with pytest.raises(ConfigError, match="SECRET_KEY must be at least 32"):
            cookie_signing_key(settings)  # web signs cookies
    assert cookie_signing_key(Settings.from_env({**DEV, **env}))  # AUTH=off: no cookie is issued; any key serves


def test_platform_urls_are_accepted_as_handed_out():
    env = {**DEV, "DATABASE_URL": "postgres://u:p@db.example:5432/app", "REDIS_URL": "rediss://:pw@r:6380"}
    s = Settings.from_env(env)
    assert s.database_url == "postgresql+psycopg://u:p@db.example:5432/app"
    assert s.redis_url == "rediss://:pw@r:6380?ssl_cert_reqs=required"  # certificates checked by default
    # Heroku Redis's self-signed certificate: one documented setting
    assert Settings.from_env({**env, "REDIS_TLS_VERIFY": "none"}).redis_url.endswith("?ssl_cert_reqs=none")
    # the URL's own word wins
    url = "rediss://:pw@r:6380?ssl_cert_reqs=optional"
    assert Settings.from_env({**env, "REDIS_URL": url, "REDIS_TLS_VERIFY": "none"}).redis_url == url
    assert (
        Settings.from_env({**DEV, "REDIS_URL": "redis://r:1/0", "REDIS_TLS_VERIFY": "none"}).redis_url
        == "redis://r:1/0"
    )


@pytest.mark.parametrize(
    ("name", "url"), [("DATABASE_URL", "mysql://admin:hunter2@db/x"), ("REDIS_URL", "http://admin:hunter2@r:1")]
)
def test_config_errors_never_print_a_password_from_a_url(name, url):
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({**DEV, name: url})
    assert name in str(exc.value) and "hunter2" not in str(exc.value)
    assert redact(url).count("***") == 1 and "hunter2" not in redact(url)


@pytest.mark.parametrize("value", [":", "admin:", ":pw", "admin"])
def test_flower_credentials_must_have_a_user_and_a_password(value):
    with pytest.raises(ConfigError, match="FLOWER_BASIC_AUTH"):
        Settings.from_env({**DEV, "FLOWER_BASIC_AUTH": value})


def test_a_flower_password_is_taken_whole_commas_and_all():
    assert Settings.from_env({**DEV, "FLOWER_BASIC_AUTH": "ops:a,b:c"}).flower_basic_auth == "ops:a,b:c"


def test_flower_listens_on_the_platform_port_unless_told_otherwise():
    assert Settings.from_env(DEV).flower_port == 5555
    assert Settings.from_env({**DEV, "PORT": "6100"}).flower_port == 6100
    assert Settings.from_env({**DEV, "PORT": "6100", "FLOWER_PORT": "7000"}).flower_port == 7000


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.0.1", True), ("localhost", True), ("[::1]", True), ("::1", True)]
    + [("0.0.0.0", False), ("", False), ("10.0.0.5", False), ("::", False), ("example.com", False)],
)
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"BROKER_URL": "redis://r:1/0"}, "BROKER_URL"),
        ({"REDIS_URL": "http://nope"}, "REDIS_URL"),
        ({"REDIS_TLS_VERIFY": "sometimes"}, "REDIS_TLS_VERIFY"),
        ({"PORT": "eighty"}, "PORT"),
        ({"WORKER_CONCURRENCY": "0"}, "WORKER_CONCURRENCY"),
        ({"AUTH": "maybe"}, "AUTH"),
        ({"MCP_SERVERS": "{bad json"}, "MCP_SERVERS"),
        ({"MCP_SERVERS": json.dumps({"mcpServers": {"x": {"args": []}}})}, "MCP_SERVERS"),
        ({"MCP_SERVERS": json.dumps({"a__b": {"command": "python"}})}, "MCP_SERVERS"),
        ({"MCP_SERVERS": json.dumps({"sql": {"command": "python", "args": "-m x"}})}, "MCP_SERVERS"),
        ({"TOOL_TIMEOUT_SECONDS": "0"}, "TOOL_TIMEOUT_SECONDS"),
        ({"MAX_TOOL_ROUNDS": "many"}, "MAX_TOOL_ROUNDS"),
        ({"KEY_CACHE_SECONDS": "-1"}, "KEY_CACHE_SECONDS"),
        ({"LOGIN_SECONDS": "10"}, "LOGIN_SECONDS"),
        ({"LIBRARY_OVERRIDES": "kombu_redis,monkey"}, "LIBRARY_OVERRIDES"),
    ],
)
def test_bad_values_stop_with_a_sentence_naming_the_variable(env, name):
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({**DEV, **env})
    assert name in str(exc.value)


def test_mcp_servers_from_json_or_a_yaml_file(tmp_path):
    config = {"mcpServers": {"sql": {"command": "python", "args": ["-m", "x"]}, "docs": {"url": "http://h/mcp"}}}
    assert set(Settings.from_env({**DEV, "MCP_SERVERS": json.dumps(config)}).mcp_servers) == {"sql", "docs"}
    path = tmp_path / "mcp.yaml"
    path.write_text("sql:\n  command: python\n")
    assert Settings.from_env({**DEV, "MCP_SERVERS": str(path)}).mcp_servers == {"sql": {"command": "python"}}


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
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "broken"}
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True)


def test_every_setting_is_documented_and_offered_to_heroku():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    read: set[str] = set()

    class Recording(dict):
        def get(self, name, default=None):
            read.add(name)
            return super().get(name, default)

    Settings.from_env(Recording(DEV))
    assert {"DATABASE_URL", "SECRET_KEY", "FLOWER_BASIC_AUTH"} <= read
    documented = (root / "docs" / "configuration.md").read_text()
    assert [name for name in sorted(read) if f"`{name}`" not in documented] == []
    offered = json.loads((root / "app.json").read_text())["env"]
    assert read - set(offered) == {"PORT", "DATABASE_URL", "REDIS_URL"}  # the platform and its add-ons set these
    assert offered["SECRET_KEY"]["generator"] == "secret"


@pytest.mark.parametrize("broker_url", ["", "amqp://u:p@rabbit:5672/ts"])
def test_the_broker_and_its_queues_follow_broker_url(broker_url):
    """RabbitMQ: quorum queues and publisher confirms; Redis: the key prefix."""
    from shared import broker, config

    settings = Settings.from_env({**DEV, "REDIS_URL": "redis://r:1/0", "BROKER_URL": broker_url})
    config.use_settings(settings)
    broker.get_celery.cache_clear()
    broker._sender_producer.cache_clear()
    try:
        conf = broker.get_celery().conf
        types = {q.name: (q.queue_arguments or {}).get("x-queue-type") for q in conf.task_queues}
        if broker_url:
            assert settings.rabbitmq and conf.broker_url == broker_url
            assert types == {"turns": "quorum", "maintenance": "quorum", "webhooks": "quorum"}
            assert broker._sender_producer().connection.transport_options.get("confirm_publish") is True
        else:
            assert not settings.rabbitmq and conf.broker_url == "redis://r:1/0"
            assert types == {"turns": None, "maintenance": None, "webhooks": None}
            assert conf.broker_transport_options["global_keyprefix"] == settings.redis_prefix
            assert "confirm_publish" not in broker._sender_producer().connection.transport_options
    finally:
        config.use_settings(None)
        broker.get_celery.cache_clear()
        broker._sender_producer.cache_clear()


def test_model_endpoints_are_named_and_default_is_openai_base_urls():
    raw = json.dumps(
        {"fast": {"base_url": "https://fast.example/v1/", "api_key": "k"}, "local": {"base_url": "http://h"}}
    )
    endpoints = Settings.from_env({**DEV, "OPENAI_BASE_URL": "http://m/v1", "MODEL_ENDPOINTS": raw}).model_endpoints
    assert {n: (e.base_url, e.api_key) for n, e in endpoints.items()} == {
        "default": ("http://m/v1", "offline"),
        "fast": ("https://fast.example/v1", "k"),
        "local": ("http://h", "none"),
    }
    assert (
        endpoints["fast"].settings == "MODEL_ENDPOINTS['fast']" and endpoints["default"].settings == "OPENAI_BASE_URL"
    )
    assert "k" not in repr(endpoints["fast"])
    for bad, words in [
        ("[1]", "must map names"),
        ("{", "not valid JSON"),
        ('{"default": {"base_url": "http://x"}}', "'default' is OPENAI_BASE_URL's"),
        ('{"a b": {"base_url": "http://x"}}', "must be 1-64 letters"),
        ('{"x": {"base_url": "ftp://x"}}', "http:// or https://"),
        ('{"x": {"url": "http://x"}}', "api_key optional"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            Settings.from_env({**DEV, "MODEL_ENDPOINTS": bad})

"""Configuration: read the environment once, validate it, fail with a sentence.

Nothing here runs at import time. `get_settings()` reads `os.environ` on first
use and caches the result for the life of the process; `Settings.from_env()`
takes any mapping so tests can build settings without touching the process.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from limits import parse_many

# The offline model server that ships with the project (offline_model/),
# and how its model list names it (so a worker can tell it is what answers).
OFFLINE_MODEL_NAME = "turnstream-offline"
OFFLINE_MODEL_OWNER = "turnstream"
LOCAL_MODEL_URL = "http://127.0.0.1:8400/v1"
LOCAL_DATABASE_URL = "postgresql://turnstream@127.0.0.1:5433/turnstream"
LOCAL_REDIS_URL = "redis://127.0.0.1:6380/0"
# A server that vanished without closing its connections (a failover to
# another address, its host lost, a partition) sends neither FIN nor RST: a
# request sent on such a connection would wait out the kernel's
# retransmissions, about 15 minutes. Postgres's and Redis's connections
# (shared/db.py, shared/redis.py) fail instead once data sent goes
# unacknowledged this long, or once an idle connection's keepalive probes,
# the first sent after this long idle, go unanswered; the next connection
# resolves the host name again, and finds the new server.
DEAD_SERVER_SECONDS = 10
KEEPALIVE_INTERVAL_SECONDS, KEEPALIVE_COUNT = 2, 3
# shared/overrides/: Turnstream's overrides of libraries' internals, by name.
OVERRIDES = (
    "kombu_redis",
    "openai_drain",
    "openai_dict_chunks",
    "httpcore_stoppable",
    "redis_pipelined",
    "redis_pubsub",
    "gunicorn_direct_write",
)
# Signs the chat page's login cookie: long enough that it cannot be guessed.
MIN_SECRET_KEY_CHARS = 32


class ConfigError(SystemExit):
    """A missing or malformed setting. Exits the process with its message."""


# The endpoint of OPENAI_BASE_URL and OPENAI_API_KEY: the default assistant's.
DEFAULT_ENDPOINT = "default"


@dataclass(frozen=True)
class ModelEndpoint:
    """An OpenAI-compatible server the operator configured, by name."""

    name: str
    base_url: str
    api_key: str = field(repr=False)  # may hold a password

    @property
    def settings(self) -> str:
        """Where the operator set it, for messages that say what to check."""
        if self.name == DEFAULT_ENDPOINT:
            return "OPENAI_BASE_URL"
        return f"MODEL_ENDPOINTS[{self.name!r}]"


@dataclass(frozen=True)
class Settings:
    env: str
    database_url: str = field(repr=False)  # may hold a password
    redis_url: str = field(repr=False)  # may hold a password
    broker_url: str = field(repr=False)  # REDIS_URL unless BROKER_URL names RabbitMQ
    redis_prefix: str
    openai_base_url: str
    openai_api_key: str = field(repr=False)  # may hold a password
    openai_model: str
    openai_max_retries: int
    openai_timeout: float
    # Every model endpoint an assistant may name: `default` (OPENAI_BASE_URL,
    # OPENAI_API_KEY) and MODEL_ENDPOINTS's. Callers name one; never a URL.
    model_endpoints: dict[str, ModelEndpoint] = field(repr=False)  # may hold keys
    mcp_servers: dict[str, Any]
    tool_timeout: float
    max_tool_rounds: int
    secret_key: str = field(repr=False)  # may hold a password
    auth_enabled: bool
    key_cache_seconds: float
    login_seconds: int
    port: int
    web_concurrency: int
    web_worker_connections: int
    worker_concurrency: int
    flower_basic_auth: str | None = field(repr=False)  # may hold a password
    flower_address: str
    flower_port: int
    log_format: str
    metrics_address: str
    worker_metrics_port: int
    beat_metrics_port: int
    allowed_origins: tuple[str, ...]
    max_body_bytes: int
    max_message_chars: int
    chat_wait_seconds: float
    event_log_maxlen: int
    event_log_ttl: int
    sse_ping_seconds: float
    max_attempts: int
    stale_queued_seconds: int
    heartbeat_seconds: float
    stale_running_seconds: int
    sweep_seconds: float
    worker_shutdown_grace: float
    worker_stall_seconds: float
    db_pool_size: int
    db_restart_wait: float
    redis_pool_size: int
    library_overrides: frozenset[str]
    forwarded_hops: int
    rate_limits_enabled: bool
    # Rate limits, as flask-limiter spells them ("60/minute"); "" is none.
    rate_limit_submit: str
    rate_limit_submit_address: str
    rate_limit_replays: str
    rate_limit_replays_address: str
    rate_limit_streams: str
    rate_limit_streams_address: str
    rate_limit_login: str
    rate_limit_login_address: str
    # Quotas per owner.
    max_active_turns: int
    max_running_turns: int
    max_streams: int
    max_replay_items: int
    max_prompt_chars: int
    approval_timeout: int
    # Circuit breakers (shared/breakers.py).
    breaker_window: float
    breaker_min_failures: int
    breaker_failure_rate: float
    breaker_cooldown: float
    model_wait: int
    # Webhooks (shared/webhooks.py).
    production: bool
    webhook_allow_private: bool
    webhook_timeout: float
    webhook_retry_schedule: tuple[float, ...]

    @property
    def rabbitmq(self) -> bool:
        """Whether Celery's broker is RabbitMQ (BROKER_URL), not Redis."""
        return self.broker_url != self.redis_url

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        r = _Reader(environ)
        # Safe unless told otherwise: local development is a choice made out
        # loud (deploy/dev.sh makes it), never what a forgotten variable gives.
        env = r.choice("TURNSTREAM_ENV", ("development", "production"), "production")
        development = env == "development"
        auth = r.choice("AUTH", ("on", "off"), "off" if development else "on")
        if auth == "off" and not development:
            raise ConfigError(
                "AUTH=off is refused unless TURNSTREAM_ENV=development: without API keys anyone who reaches"
                " the server reads every conversation and spends the model account."
            )
        port = r.int("PORT", 8000, lo=1, hi=65535)
        redis_url = _redis_url(r.str("REDIS_URL", LOCAL_REDIS_URL), r.choice("REDIS_TLS_VERIFY", CERT_REQS, "required"))
        default_endpoint = ModelEndpoint(
            DEFAULT_ENDPOINT,
            r.str("OPENAI_BASE_URL", LOCAL_MODEL_URL).rstrip("/"),
            r.str("OPENAI_API_KEY", "offline"),
        )
        settings = cls(
            env=env,
            database_url=_sqlalchemy_url(r.str("DATABASE_URL", LOCAL_DATABASE_URL), "DATABASE_URL"),
            redis_url=redis_url,
            broker_url=_broker_url(r.str("BROKER_URL", ""), redis_url),
            redis_prefix=r.str("REDIS_PREFIX", "ts:"),
            openai_base_url=default_endpoint.base_url,
            openai_api_key=default_endpoint.api_key,
            openai_model=r.str("OPENAI_MODEL", OFFLINE_MODEL_NAME),
            openai_max_retries=r.int("OPENAI_MAX_RETRIES", 3, lo=0, hi=20),
            openai_timeout=r.float("OPENAI_TIMEOUT", 60.0, lo=0.1),
            model_endpoints=_model_endpoints(r.str("MODEL_ENDPOINTS", ""), default_endpoint),
            mcp_servers=_mcp_servers(r.str("MCP_SERVERS", "")),
            tool_timeout=r.float("TOOL_TIMEOUT_SECONDS", 30.0, lo=0.1),
            max_tool_rounds=r.int("MAX_TOOL_ROUNDS", 8, lo=0, hi=100),
            secret_key=r.str("SECRET_KEY", ""),
            auth_enabled=auth == "on",
            key_cache_seconds=r.float("KEY_CACHE_SECONDS", 60.0, lo=0.0, hi=3600.0),
            login_seconds=r.int("LOGIN_SECONDS", 7 * 86400, lo=60),
            port=port,
            web_concurrency=r.int("WEB_CONCURRENCY", 2, lo=1, hi=64),
            web_worker_connections=r.int("WEB_WORKER_CONNECTIONS", 10_000, lo=1),
            worker_concurrency=r.int("WORKER_CONCURRENCY", 32, lo=1, hi=1000),
            flower_basic_auth=_flower_credential(r.str("FLOWER_BASIC_AUTH", "")),
            flower_address=r.str("FLOWER_ADDRESS", "0.0.0.0"),
            flower_port=r.int("FLOWER_PORT", port if "PORT" in environ else 5555, lo=1, hi=65535),
            log_format=r.choice("LOG_FORMAT", ("text", "json"), "text"),
            metrics_address=r.str("METRICS_ADDRESS", "127.0.0.1"),
            worker_metrics_port=r.int("WORKER_METRICS_PORT", 9101, lo=0, hi=65535),
            beat_metrics_port=r.int("BEAT_METRICS_PORT", 9102, lo=0, hi=65535),
            allowed_origins=_origins(r.str("ALLOWED_ORIGINS", "")),
            max_body_bytes=r.int("MAX_BODY_BYTES", 256 * 1024, lo=1024),
            max_message_chars=r.int("MAX_MESSAGE_CHARS", 32_000, lo=1),
            chat_wait_seconds=r.float("CHAT_WAIT_SECONDS", 30.0, lo=0.0),
            event_log_maxlen=r.int("EVENT_LOG_MAXLEN", 10_000, lo=10),
            event_log_ttl=r.int("EVENT_LOG_TTL", 3600, lo=1),
            sse_ping_seconds=r.float("SSE_PING_SECONDS", 15.0, lo=0.05),
            max_attempts=r.int("TURN_MAX_ATTEMPTS", 3, lo=1, hi=100),
            stale_queued_seconds=r.int("STALE_QUEUED_SECONDS", 60, lo=1),
            heartbeat_seconds=r.float("HEARTBEAT_SECONDS", 5.0, lo=0.1),
            stale_running_seconds=r.int("STALE_RUNNING_SECONDS", 20, lo=1),
            sweep_seconds=r.float("SWEEP_SECONDS", 10.0, lo=0.5),
            worker_shutdown_grace=r.float("WORKER_SHUTDOWN_GRACE_SECONDS", 20.0, lo=0.0),
            worker_stall_seconds=r.float("WORKER_STALL_SECONDS", 60.0, lo=2.0),
            db_pool_size=r.int("DB_POOL_SIZE", 10, lo=1, hi=500),
            db_restart_wait=r.float("DB_RESTART_WAIT_SECONDS", 30.0, lo=0.0),
            redis_pool_size=r.int("REDIS_POOL_SIZE", 2, lo=1, hi=1000),
            library_overrides=_overrides(r.str("LIBRARY_OVERRIDES", "all")),
            forwarded_hops=r.int("FORWARDED_HOPS", 0, lo=0, hi=10),
            rate_limits_enabled=r.choice("RATE_LIMITS", ("on", "off"), "on") == "on",
            rate_limit_submit=r.limit("RATE_LIMIT_SUBMIT", "60/minute"),
            rate_limit_submit_address=r.limit("RATE_LIMIT_SUBMIT_ADDRESS", "300/minute"),
            rate_limit_replays=r.limit("RATE_LIMIT_REPLAYS", "20/hour"),
            rate_limit_replays_address=r.limit("RATE_LIMIT_REPLAYS_ADDRESS", "60/hour"),
            rate_limit_streams=r.limit("RATE_LIMIT_STREAMS", "300/minute"),
            rate_limit_streams_address=r.limit("RATE_LIMIT_STREAMS_ADDRESS", "1200/minute"),
            rate_limit_login=r.limit("RATE_LIMIT_LOGIN", "10/minute"),
            rate_limit_login_address=r.limit("RATE_LIMIT_LOGIN_ADDRESS", "30/minute"),
            max_active_turns=r.int("MAX_ACTIVE_TURNS_PER_OWNER", 100, lo=1),
            max_running_turns=r.int("MAX_RUNNING_TURNS_PER_OWNER", 16, lo=1),
            max_streams=r.int("MAX_STREAMS_PER_OWNER", 200, lo=1),
            max_replay_items=r.int("MAX_REPLAY_ITEMS_PER_OWNER", 20_000, lo=1),
            max_prompt_chars=r.int("MAX_PROMPT_CHARS", 20_000, lo=1, hi=1_000_000),
            approval_timeout=r.int("APPROVAL_TIMEOUT_SECONDS", 86_400, lo=1),
            breaker_window=r.float("BREAKER_WINDOW_SECONDS", 30.0, lo=1.0, hi=3600.0),
            breaker_min_failures=r.int("BREAKER_MIN_FAILURES", 5, lo=1),
            breaker_failure_rate=r.float("BREAKER_FAILURE_RATE", 0.5, lo=0.01, hi=1.0),
            breaker_cooldown=r.float("BREAKER_COOLDOWN_SECONDS", 15.0, lo=0.1, hi=3600.0),
            model_wait=r.int("MODEL_WAIT_SECONDS", 300, lo=0),
            production=not development,
            webhook_allow_private=r.choice("WEBHOOK_ALLOW_PRIVATE", ("on", "off"), "off") == "on",
            webhook_timeout=r.float("WEBHOOK_TIMEOUT_SECONDS", 15.0, lo=0.1, hi=60.0),
            webhook_retry_schedule=_schedule(r.str("WEBHOOK_RETRY_SCHEDULE", DEFAULT_RETRY_SCHEDULE)),
        )
        if settings.stale_running_seconds < 2 * settings.heartbeat_seconds:
            raise ConfigError("STALE_RUNNING_SECONDS must be at least twice HEARTBEAT_SECONDS.")
        return settings


def cookie_signing_key(settings: Settings) -> str:
    """The key that signs the chat page's login cookie, for the web tier
    (the only one that signs cookies): SECRET_KEY, required with
    authentication on; with it off no cookie is issued, and a random key
    serves Flask."""
    if not settings.auth_enabled:
        return settings.secret_key or secrets.token_hex(32)
    if len(settings.secret_key) < MIN_SECRET_KEY_CHARS:
        raise ConfigError(
            f"SECRET_KEY must be at least {MIN_SECRET_KEY_CHARS} random characters when authentication is on"
            " (web signs the chat page's login cookie with it); make one with"
            " `python -c 'import secrets; print(secrets.token_hex(32))'`."
        )
    return settings.secret_key


_chosen: Settings | None = None


@functools.cache
def get_settings() -> Settings:
    """The process's settings: those given to `use_settings()` (which
    `create_app(settings)` calls), else read from the environment on first use."""
    return _chosen if _chosen is not None else Settings.from_env(os.environ)


def use_settings(settings: Settings | None) -> None:
    """Make `settings` the process's, for shared code too (None: read the
    environment again). Call it before anything connects: engines and
    clients are built once, from the settings of their first use."""
    global _chosen
    _chosen = settings
    get_settings.cache_clear()


class _Reader:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def str(self, name: str, default: str | None) -> str:
        value = self.environ.get(name)
        if value is None or value == "":
            if default is None:
                raise ConfigError(f"{name} is required but not set.")
            return default
        return value.strip()

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.str(name, default).lower()
        if value not in options:
            raise ConfigError(f"{name} must be one of {', '.join(options)}; got {value!r}.")
        return value

    def limit(self, name: str, default: str) -> str:
        """A rate limit as flask-limiter spells it ("60/minute;1000/day"), or
        "" for `off`."""
        value = self.str(name, default).strip()
        if value == "off":
            return ""
        try:
            parse_many(value)
        except ValueError:
            raise ConfigError(f"{name} must be a rate limit like 60/minute (several joined by ;) or off.") from None
        return value

    def int(self, name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        return self._number(name, default, int, "a whole number", lo, hi)

    def float(self, name: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
        return self._number(name, default, float, "a number", lo, hi)

    def _number(self, name, default, cast, kind, lo, hi):
        raw = self.str(name, str(default))
        try:
            value = cast(raw)
        except ValueError:
            raise ConfigError(f"{name} must be {kind}; got {raw!r}.") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{name} must be between {lo} and {hi}; got {value}.")
        return value


def redact(url: str) -> str:
    """The URL with its password replaced, fit for a message or a log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def is_loopback(host: str) -> bool:
    """Whether an address (a bind's host part) is reachable from this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _sqlalchemy_url(url: str, name: str) -> str:
    """Accept the URL as platforms hand it out and pick the psycopg 3 driver."""
    scheme, sep, rest = url.partition("://")
    if not sep or not rest:
        raise ConfigError(f"{name} must be a URL such as postgres://user:pass@host:5432/db; got {redact(url)!r}.")
    if scheme in ("postgres", "postgresql", "postgresql+psycopg"):
        return f"postgresql+psycopg://{rest}"
    raise ConfigError(f"{name} must be a postgres:// or postgresql:// URL; got scheme {scheme!r}.")


# Certificate checks for rediss://, as redis-py and kombu both spell them.
CERT_REQS = ("required", "optional", "none")


def _redis_url(url: str, verify: str) -> str:
    """REDIS_URL, with REDIS_TLS_VERIFY spelled into a rediss:// URL's query
    (where redis-py and Celery's transport both read it) unless the URL
    says otherwise. Platforms hand out rediss:// URLs with no such
    parameter, some (Heroku Redis) with a self-signed certificate."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.netloc or parts.path):
        raise ConfigError(f"REDIS_URL must be a redis:// or rediss:// URL; got {redact(url)!r}.")
    if parts.scheme != "rediss":
        return url
    query = dict(parse_qsl(parts.query))
    query.setdefault("ssl_cert_reqs", verify)
    return urlunsplit(parts._replace(query=urlencode(query)))


def _broker_url(url: str, redis_url: str) -> str:
    """BROKER_URL: Celery's broker, RabbitMQ (amqp:// or amqps://) or,
    unset, the Redis of REDIS_URL."""
    if not url:
        return redis_url
    if urlsplit(url).scheme not in ("amqp", "amqps") or not urlsplit(url).netloc:
        raise ConfigError(
            f"BROKER_URL must be an amqp:// or amqps:// URL (RabbitMQ), or unset for REDIS_URL; got {redact(url)!r}."
        )
    return url


def _origins(value: str) -> tuple[str, ...]:
    """ALLOWED_ORIGINS: comma-separated origins, as a browser sends them
    (`https://host[:port]`, no path; a trailing slash is dropped)."""
    origins = []
    for raw in value.split(","):
        origin = raw.strip().rstrip("/")
        if not origin:
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
            raise ConfigError(f"ALLOWED_ORIGINS: {raw.strip()!r} is not an origin like https://chat.example.com.")
        origins.append(origin)
    return tuple(origins)


# Seconds before each retry of a webhook after a failed attempt (the first
# attempt goes at once): the Standard Webhooks specification's, about 28
# hours in all.
DEFAULT_RETRY_SCHEDULE = "5,300,1800,7200,18000,36000,36000"


def _schedule(value: str) -> tuple[float, ...]:
    """WEBHOOK_RETRY_SCHEDULE: comma-separated seconds, each at most a day."""
    try:
        waits = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        waits = ()
    if not waits or any(not 0 <= w <= 86400 for w in waits) or len(waits) > 20:
        raise ConfigError(
            f"WEBHOOK_RETRY_SCHEDULE must be up to 20 comma-separated seconds, each 0 to 86400; got {value!r}."
        )
    return waits


def _overrides(value: str) -> frozenset[str]:
    """LIBRARY_OVERRIDES: `all`, `none`, or a comma-separated list of names."""
    if value == "all":
        return frozenset(OVERRIDES)
    names = frozenset() if value == "none" else frozenset(n.strip() for n in value.split(",") if n.strip())
    unknown = sorted(names - set(OVERRIDES))
    if unknown:
        raise ConfigError(f"LIBRARY_OVERRIDES: unknown {', '.join(unknown)}; the names are {', '.join(OVERRIDES)}.")
    return names


def _flower_credential(value: str) -> str | None:
    """FLOWER_BASIC_AUTH: one `user:password`, taken whole (commas and all)."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not (sep and user and password):
        raise ConfigError("FLOWER_BASIC_AUTH must be user:password, both parts non-empty.")
    return value


def _model_endpoints(raw: str, default: ModelEndpoint) -> dict[str, ModelEndpoint]:
    """MODEL_ENDPOINTS: JSON `{"name": {"base_url": …, "api_key": …}}`;
    `default` is OPENAI_BASE_URL's and cannot be named again."""
    endpoints = {default.name: default}
    if not raw:
        return endpoints
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"MODEL_ENDPOINTS is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise ConfigError('MODEL_ENDPOINTS must map names to {"base_url": …, "api_key": …}.')
    for name, spec in data.items():
        if name == DEFAULT_ENDPOINT:
            raise ConfigError("MODEL_ENDPOINTS: 'default' is OPENAI_BASE_URL's endpoint; name yours otherwise.")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ConfigError(f"MODEL_ENDPOINTS: name {name!r} must be 1-64 letters, digits, '.', '-' or '_'.")
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("base_url"), str)
            or set(spec) - {"base_url", "api_key"}
        ):
            raise ConfigError(f'MODEL_ENDPOINTS: {name!r} must be {{"base_url": …, "api_key": …}} (api_key optional).')
        if urlsplit(spec["base_url"]).scheme not in ("http", "https"):
            raise ConfigError(f"MODEL_ENDPOINTS: {name!r}'s base_url must be an http:// or https:// URL.")
        endpoints[name] = ModelEndpoint(name, spec["base_url"].rstrip("/"), str(spec.get("api_key") or "none"))
    return endpoints


def _mcp_servers(raw: str) -> dict[str, Any]:
    """MCP_SERVERS: JSON, or the path of a JSON or YAML file, in the common
    `{"mcpServers": {...}}` shape (the outer key may be left out)."""
    if not raw:
        return {}
    text = raw
    if not raw.lstrip().startswith("{"):
        path = Path(raw)
        if not path.is_file():
            raise ConfigError(f"MCP_SERVERS must be JSON or the path of a JSON or YAML file; {raw!r} is neither.")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"MCP_SERVERS file {raw} is not valid YAML: {exc}.") from None
            return _mcp_shape(data)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"MCP_SERVERS is not valid JSON: {exc}.") from None
    return _mcp_shape(data)


def _mcp_shape(data: Any) -> dict[str, Any]:
    if isinstance(data, dict) and "mcpServers" in data:
        data = data["mcpServers"]
    if not isinstance(data, dict):
        raise ConfigError("MCP_SERVERS must map server names to {command, args, env} or {url, headers}.")
    for name, server in data.items():
        if not isinstance(server, dict) or not ({"command", "url"} & server.keys()):
            raise ConfigError(f"MCP_SERVERS: server {name!r} needs a 'command' (stdio) or a 'url' (HTTP).")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,30}", str(name)) or "__" in str(name):
            raise ConfigError(
                f"MCP_SERVERS: server name {name!r} must be 1-30 letters, digits, '-' or '_' (no '__'):"
                " tools reach the model as <server>__<tool>."
            )
        for key, kind in (("args", list), ("env", dict), ("headers", dict)):
            if key in server and not isinstance(server[key], kind):
                raise ConfigError(f"MCP_SERVERS: {key!r} of server {name!r} must be a {kind.__name__}.")
    return data

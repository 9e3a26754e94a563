#!/usr/bin/env bash
# Set up everything Turnstream needs on a Debian machine, idempotently:
# Debian packages (redis-server, postgresql, rabbitmq-server, pgbouncer, chromium), a virtual environment in .venv
# with the pinned requirements (production's and the development tools), the
# project installed in it. Run as root, or with sudo available. --python: the
# virtual environment only (what the tests that need no service use).
set -euo pipefail
cd "$(dirname "$0")/.."
sudo_=()
[ "$(id -u)" = 0 ] || sudo_=(sudo)
missing=()
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ "${1:-}" != "--python" ]; then
  command -v redis-server >/dev/null || missing+=(redis-server)
  ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 || missing+=(postgresql)
  command -v openssl >/dev/null || missing+=(openssl)  # the tests' TLS Redis
  command -v chromium >/dev/null || missing+=(chromium)  # the browser tests (Playwright drives it; no download)
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)  # BROKER_URL=amqp://, and its tests
  [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)  # the tests reach Postgres through it
  command -v ip >/dev/null || missing+=(iproute2)  # the multi-host test's network namespaces
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  "${sudo_[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian starts its own Redis, Postgres, RabbitMQ and PgBouncer services where it can;
# Turnstream runs private instances on other ports and does not need them.

stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python requirements" >&2
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
  echo "$want" > "$stamp"
fi

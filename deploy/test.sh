#!/usr/bin/env bash
# Set up (packages, venv) and run the tests. The tests start their own
# Postgres (and PgBouncer), Redis (and RabbitMQ), offline model, Celery
# worker and gunicorn on free ports. Arguments go to pytest, in both runs.
#
# --fast: only the tests that need no service (marked `fast`: the state
# machine, validation, the event schema, the settings, pure logic), in
# seconds, with nothing but the virtual environment set up.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fast" ]; then
  shift
  bash deploy/setup.sh --python
  .venv/bin/ruff check .
  TEST_TIER=fast exec .venv/bin/pytest -m fast "$@"
fi
bash deploy/setup.sh
.venv/bin/ruff check .
# Everything, with Postgres behind PgBouncer in transaction pooling mode, as
# managed Postgres serves it (the chaos tests also restart it both ways).
TEST_POSTGRES=pgbouncer .venv/bin/pytest "$@"
# What depends on Celery's broker (sending, redelivery, a worker killed, the
# broker's own crash), again with RabbitMQ as the broker and Postgres direct.
status=0
TEST_BROKER=rabbitmq .venv/bin/pytest -m broker "$@" || status=$?
[ "$status" = 5 ] && exit 0  # the arguments chose none of them
exit "$status"

#!/usr/bin/env bash
# Set up (packages, venv) and run the tests. The tests start their own
# Postgres, Redis, offline model, Celery worker and gunicorn on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
.venv/bin/ruff check .
exec .venv/bin/pytest "$@"
